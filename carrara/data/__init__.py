"""Captioned image datasets: `shapes` (procedural), `emoji` (rendered font), `folder` (any images + captions).

Import the submodule you need (`from carrara.data.folder import load_folder`); nothing is imported here.
"""
