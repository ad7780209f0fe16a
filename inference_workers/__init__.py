"""Inference workers: MindSpore ranks serving token-id requests over ZeroMQ with typed msgpack messages."""
