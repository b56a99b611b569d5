"""Data in and out: real detection datasets (COCO, LVIS, Objects365) and WebDataset shards."""
