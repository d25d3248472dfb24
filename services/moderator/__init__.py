"""The moderator: consumes uploads, embeds and classifies them, finds near-duplicates, publishes verdicts."""
