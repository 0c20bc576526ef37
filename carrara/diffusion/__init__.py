"""The diffusion core: noise schedules, objectives, samplers, guidance and the generation settings (no networks).

Import the submodule you need (`from carrara.diffusion.samplers import SAMPLERS`); nothing is imported here, so
`carrara.diffusion.settings` (the defaults the CLI shows) costs no torch import.
"""
