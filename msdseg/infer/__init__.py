"""Stage 4: grid-aggregated prediction per subject, written back in the subject's original geometry."""
