"""The training loop and what it needs: LR schedule, EMA, logging, sampling of previews."""
