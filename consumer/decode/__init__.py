"""Bytes to face crops: image decoding, face detection and cropping, and the decoder processes."""
