"""Input pipelines: image sources, DINO's multi-crop augmentation, the evaluation transform."""
