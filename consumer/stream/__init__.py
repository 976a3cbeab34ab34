"""The stream runtime: poll loop, offsets, commits, batching, publishing, Kafka I/O, test broker."""
