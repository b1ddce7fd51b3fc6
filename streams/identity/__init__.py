"""Identity domain: stitch anonymousId and userId into one canonical profile id."""
