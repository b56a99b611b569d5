"""Scoring detections: box AP on COCO-format (COCO, Objects365) and LVIS ground truth."""
