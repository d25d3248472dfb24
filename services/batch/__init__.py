"""Batch tools for reviewers and data teams: ``sieve explain`` (why two images match) and ``sieve dedup``.

Both run the embedder version Triton serves (over gRPC when it is up, else the same artifact in-process), so
what they say about a pair or a folder is what the moderator would say about the same uploads.
"""
