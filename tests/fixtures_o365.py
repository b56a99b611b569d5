"""An Objects365-shaped dataset for tests: a COCO-format instances JSON (no image or instance
counts, so they are counted from the boxes) with 365 categories, the first of them spelt as
Objects365 v2 spells the COCO-base categories (capitals, "Monitor/TV", "Bowl/Basin").

    ann, root = make_o365_dataset(tmp_path)
"""
from __future__ import annotations

from tests.fixtures_coco import make_coco_dataset

# Objects365 v2's names of OVR-CNN's 48 COCO base categories, in COCO's order: written here apart
# from configs/coco_base_in_o365_lvis.txt, so a typo in either fails the cross-dataset dry run.
O365_COCO_BASE = [
    "Person", "Bicycle", "Car", "Motorcycle", "Train", "Truck", "Boat", "Bench", "Wild Bird", "Horse", "Sheep",
    "Bear", "Zebra", "Giraffe", "Backpack", "Handbag/Satchel", "Luggage", "Frisbee", "Skiboard", "Kite", "Surfboard",
    "Bottle", "Fork", "Spoon", "Bowl/Basin", "Banana", "Apple", "Sandwich", "Orange/Tangerine", "Broccoli", "Carrot",
    "Pizza", "Donut", "Chair", "Bed", "Toilet", "Monitor/TV", "Laptop", "Mouse", "Remote", "Microwave", "Oven",
    "Toaster", "Refrigerator", "Book", "Clock", "Vase", "Toothbrush"]
# LVIS v1's names of the same 48.
LVIS_COCO_BASE = [
    "person", "bicycle", "car_(automobile)", "motorcycle", "train_(railroad_vehicle)", "truck", "boat", "bench", "bird",
    "horse", "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "ski", "kite",
    "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange_(fruit)", "broccoli",
    "carrot", "pizza", "doughnut", "chair", "bed", "toilet", "television_set", "laptop_computer",
    "mouse_(computer_equipment)", "remote_control", "microwave_oven", "oven", "toaster", "refrigerator", "book",
    "clock", "vase", "toothbrush"]


def o365_names(n: int = 365) -> list[str]:
    return O365_COCO_BASE + [f"O365 Thing {i}" for i in range(n - len(O365_COCO_BASE))]


def make_o365_dataset(tmp_path, n_images: int = 2) -> tuple[str, str]:
    """(instances JSON, image root): 365 categories, each boxed once per image."""
    names = o365_names()
    # One grid cell per category plus a spare: 4 pixels a cell.
    return make_coco_dataset(tmp_path, n_images=n_images, categories=names, size=4 * (len(names) + 1))
