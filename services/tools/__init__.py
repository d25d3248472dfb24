"""Tools for people, not the stream: ``sieve explain`` (why two images match) and ``sieve dedup`` (a folder's clusters).

Both run the embedder version Triton serves (over gRPC when it is up, else the same artifact in-process), so
what they say about a pair or a folder is what the moderator would say about the same uploads.
"""
