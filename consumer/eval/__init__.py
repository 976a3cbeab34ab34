"""`emotion-worker eval`: accuracy and calibration reports of a checkpoint, and their plots."""
