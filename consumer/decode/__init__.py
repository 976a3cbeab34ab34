"""Bytes to face crops: image decoding, face detection and cropping, the decoder processes,
and the quality of each face crop."""
