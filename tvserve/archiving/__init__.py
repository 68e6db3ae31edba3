"""The archiving side: turning torchvision weights, training checkpoints and Python models into
`.mar` archives, checked and tuned for the machine (see README, "Layout")."""
