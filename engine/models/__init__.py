"""Model helpers: locally generated demo checkpoints and per-architecture adapters."""
