"""The moderator's stages, in the order a batch goes through them.

``intake`` (parse, redeliveries, dead letters) -> ``prepare`` (fetch on threads, decode-and-hash in worker
processes) -> ``fast_path`` (bank hash matches, exact re-uploads) -> ``infer`` (Triton, ahead of the decision
where it can) -> ``candidates`` (the index's first pass; the keypoint second pass where the first is unsure) ->
``verify`` (local features, in the workers) -> ``assemble`` (the ordered decision, reviews, bank actions) ->
``commit`` (after the verdicts are acknowledged). ``services.moderator.pipeline`` only orchestrates them.

Stage records (``PreparedImage``, ``Inferred``, candidates, verifications) are plain picklable data; the Kafka
message and its span stay in the ``Item`` envelope and never leave this process.
"""
