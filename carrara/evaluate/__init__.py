"""Evaluation: faithfulness of generated `shapes` images to their captions, read back by an analytic detector."""
