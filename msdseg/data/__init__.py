"""Stage 1-2: fetch, verify, extract, check and resample Decathlon data; build the subject manifest."""
