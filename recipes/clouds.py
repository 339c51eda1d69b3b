"""clouds: ground-level cloud photos in 7 classes from two image folders, a two-block ELU CNN, Adam lr 1e-3.

A preset of image_folder (its data, model, metrics and prediction) with the tutorial's folders and augmentation.
Raw files: <data.root>/clouds_train/<class name>/*.jpg and <data.root>/clouds_test/<class name>/*.jpg. Files
without an image extension are skipped (ImageFolder's rule); an image file that does not decode stops prepare
with its path, so no class silently loses samples.
python launch/train.py recipe=clouds data.root=data
"""

from recipes import image_folder
from recipes._augment import rotate

__all__ = ["recipe", "rotate", "transform"]  # rotate and transform: image_folder's, importable from here

GET_DATA = (
    "get the clouds image folders of DataCamp's 'Intermediate Deep Learning with PyTorch' (7 classes; "
    "no download here), unpack them so that clouds_train/ and clouds_test/ sit side by side, and pass "
    "data.root=<the folder that holds them>"
)

recipe = image_folder.recipe_for(
    name="clouds",
    description="clouds image folders (7 classes), CNN conv32-conv64-linear with ELU, Adam lr 1e-3, batch 16",
    # The tutorial's Resize((64, 64)) of RGB photos, and its RandomHorizontalFlip, RandomRotation(45),
    # RandomAutocontrast, each drawn per image.
    defaults={
        "data": {
            "root": "data",
            "train_dir": "clouds_train",
            "test_dir": "clouds_test",
            "image_size": 64,
            "channels": 3,
            "resize": "stretch",
            "augment": ["hflip", "rotate:45", "autocontrast"],
        }
    },
    hint=GET_DATA,
)
transform = recipe.transform
