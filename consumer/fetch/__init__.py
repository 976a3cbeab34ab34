"""Image references to bytes: http(s) (SSRF policy, deadlines, keep-alive pool), s3, file, data:."""
