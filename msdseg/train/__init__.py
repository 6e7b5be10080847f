"""Stage 3: patch-queue training (sampling, augmentation, loop, checkpoints, pace probes)."""
