"""visiontune components: the pipeline's steps as plain typed functions (no Prefect, no DVC)."""
