"""Generated from protos/: the dtx v1 API."""
