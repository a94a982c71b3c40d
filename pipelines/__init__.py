"""visiontune pipelines: the CLI, the Prefect flow and their entry points."""
