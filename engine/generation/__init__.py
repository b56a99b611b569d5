"""Making the dataset: prompts -> synthesis -> annotation -> shards (the pipeline), then export."""
