"""Pieces of the trainer (`python -m segmamba.train`): config, distributed setup, loop,
validation, checkpoint/resume state and run reports."""
