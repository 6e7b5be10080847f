"""Stage 5: Dice tables per subject and class, summaries and plots."""
