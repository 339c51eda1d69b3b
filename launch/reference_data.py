"""The public data sets of launch/reference.py, each written to files as a user would write them (CSV tables, PNG
folders with a test folder apart, CSV series with real calendar dates), returning the recipe's arguments."""

from __future__ import annotations

import gzip
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TEST_DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


@dataclass(frozen=True)
class Entry:
    """One data set: how to write it as files (returns the recipe's arguments)."""

    family: str
    name: str
    write: Callable[[Path], list[str]]
    quick: bool = False  # in the --quick table (one small set per family)
    period: int = 0  # series: steps in one season, for the seasonal naive forecast (0: none)


TEST_FRACTION = 0.2  # images: the share of each class written to the test folder


# ---------------------------------------------------------------- the data sets, written as files


def sklearn_table(loader: str, target: str, classes: bool):
    def write(folder: Path) -> list[str]:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader)(as_frame=True)
        frame = bunch.frame.rename(columns={"target": target})
        if classes:  # class names as text, as most tables hold them
            frame[target] = frame[target].map(dict(enumerate(bunch.target_names)))
        path = folder / f"{loader.removeprefix('load_')}.csv"
        frame.to_csv(path, index=False)
        return ["recipe=tabular", f"data.file={path}", f"data.target={target}"]

    return write


def statsmodels_table(name: str, target: str):
    """One of statsmodels' data sets as the CSV it would be published as (a text column stays text)."""

    def write(folder: Path) -> list[str]:
        path = folder / f"{name}.csv"
        statsmodels_data(name).to_csv(path, index=False)
        return ["recipe=tabular", f"data.file={path}", f"data.target={target}"]

    return write


def water_potability(folder: Path) -> list[str]:
    """The tests' Kaggle water quality CSV (3,275 rows, empty cells in three columns), as published."""
    path = folder / "water_potability.csv"
    shutil.copyfile(TEST_DATA / "water-potability" / "water_potability.csv", path)
    return ["recipe=tabular", f"data.file={path}", "data.target=Potability"]


def save_pngs(images, labels, folder: Path) -> None:
    """uint8 grey images [N, H, W] as <folder>/<label>/<index>.png."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / str(label) / f"{i:05d}.png")


def split_test(source: Path, folder: Path) -> list[str]:
    """The images under <source>/<class>/... moved to <folder>/train/ and <folder>/test/ (TEST_FRACTION of each
    class, drawn with a fixed seed), keeping their subfolders: the runs and the baselines are scored on test."""
    from sklearn.model_selection import train_test_split

    files = sorted(path.relative_to(source) for path in source.rglob("*.png"))
    train, test = train_test_split(files, test_size=TEST_FRACTION, stratify=[f.parts[0] for f in files], random_state=0)
    for split, part in (("train", train), ("test", test)):
        for file in part:
            (folder / split / file).parent.mkdir(parents=True, exist_ok=True)
            (source / file).rename(folder / split / file)
    shutil.rmtree(source)
    return ["recipe=image_folder", f"data.train_dir={folder / 'train'}", f"data.test_dir={folder / 'test'}"]


def digits_images(folder: Path) -> list[str]:
    """scikit-learn's 1,797 8x8 digits (values 0-16) as 8x8 grey PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    save_pngs((digits.images * (255 / 16)).round().astype("uint8"), digits.target, folder / "all")
    return split_test(folder / "all", folder)


def mnist_images(folder: Path) -> list[str]:
    """The MNIST test set (10,000 28x28 digits) from its IDX files, read by torchvision's readers, as PNGs."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = {}
    for source in (TEST_DATA / "mnist-test").glob("*.gz"):
        with gzip.open(source) as f:
            (folder / source.stem).write_bytes(f.read())
        raw[source.stem] = str(folder / source.stem)
    images, labels = read_image_file(raw["t10k-images-idx3-ubyte"]), read_label_file(raw["t10k-labels-idx1-ubyte"])
    save_pngs(images.numpy(), labels.numpy(), folder / "all")
    return split_test(folder / "all", folder)


def omniglot_images(folder: Path) -> list[str]:
    """Omniglot's 5-alphabet subset (2,720 105x105 PNGs in <alphabet>/<character>/): which alphabet."""
    with zipfile.ZipFile(TEST_DATA / "omniglot-small" / "images_background_small1.zip") as z:
        z.extractall(folder)
    return split_test(folder / "images_background_small1", folder)


def series_file(name: str, frame: Callable):
    """A series as `date,<value column>` with its real calendar dates; `frame()` returns the two columns."""

    def write(folder: Path) -> list[str]:
        import pandas as pd

        table = pd.DataFrame(frame())
        path = folder / f"{name}.csv"
        table.to_csv(path, index=False, date_format="%Y-%m-%d")  # an empty value stays an empty cell
        return [
            "recipe=time_series",
            f"data.file={path}",
            "data.time_column=date",
            f"data.value_column={table.columns[1]}",
        ]

    return write


def statsmodels_data(name: str):
    import statsmodels.api as sm

    return getattr(sm.datasets, name).load_pandas().data


def yearly(name: str, year: str, value: str, column: str) -> Callable:
    def frame():
        import pandas as pd

        data = statsmodels_data(name)
        return {"date": pd.to_datetime(data[year].astype(int).astype(str) + "-01-01"), column: data[value].to_numpy()}

    return frame


def quarterly(column: str) -> Callable:
    """A column of statsmodels' macrodata (US, 1959-2009) on its quarters' first days."""

    def frame():
        import pandas as pd

        data = statsmodels_data("macrodata")
        quarters = pd.PeriodIndex.from_fields(
            year=data["year"].astype(int), quarter=data["quarter"].astype(int), freq="Q"
        )
        return {"date": quarters.to_timestamp(), column: data[column].to_numpy()}

    return frame


def co2() -> dict:
    data = statsmodels_data("co2")  # weekly, Saturdays, 59 weeks without a value
    return {"date": data.index, "co2": data["co2"].to_numpy()}


def elnino() -> dict:
    import pandas as pd

    data = statsmodels_data("elnino").melt(id_vars="YEAR", var_name="month", value_name="temp")  # a row a year
    data["date"] = pd.to_datetime(data["YEAR"].astype(int).astype(str) + data["month"], format="%Y%b")
    data = data.sort_values("date")
    return {"date": data["date"].to_numpy(), "temp": data["temp"].to_numpy()}


def electricity(folder: Path) -> list[str]:
    """Not public data: a daily pattern of 96 quarter hours plus noise (seed 0), for the electricity_forecast
    preset, in its layout."""
    import numpy as np
    import pandas as pd

    t = np.arange(2000)
    value = (
        100
        + 30 * np.sin(2 * np.pi * t / 96)
        + 10 * np.sin(4 * np.pi * t / 96 + 1)
        + np.random.default_rng(0).normal(0, 6, len(t))
    )
    pd.DataFrame(
        {"timestamp": pd.date_range("2016-01-01 00:15:00", periods=len(t), freq="15min"), "consumption": value.round(3)}
    ).to_csv(folder / "electricity.csv", index=False)
    return ["recipe=electricity_forecast", f"data.root={folder}"]


ENTRIES = [
    Entry("tables", "iris", sklearn_table("load_iris", "species", True), quick=True),
    Entry("tables", "wine", sklearn_table("load_wine", "cultivar", True)),
    Entry("tables", "breast_cancer", sklearn_table("load_breast_cancer", "diagnosis", True)),
    Entry("tables", "water_potability", water_potability),
    Entry("tables", "diabetes", sklearn_table("load_diabetes", "progression", False)),
    Entry("tables", "grunfeld", statsmodels_table("grunfeld", "invest")),  # a text column: the firm
    Entry("tables", "engel", statsmodels_table("engel", "foodexp")),
    Entry("tables", "fair", statsmodels_table("fair", "affairs")),
    Entry("tables", "randhie", statsmodels_table("randhie", "mdvis")),
    Entry("images", "digits", digits_images, quick=True),
    Entry("images", "omniglot_alphabets", omniglot_images),
    Entry("images", "mnist_test", mnist_images),
    Entry(
        "series",
        "sunspots",
        series_file("sunspots", yearly("sunspots", "YEAR", "SUNACTIVITY", "sunspots")),
        quick=True,
        period=11,
    ),  # no calendar season: the ~11-year cycle
    Entry("series", "nile", series_file("nile", yearly("nile", "year", "volume", "volume"))),
    Entry("series", "realgdp", series_file("realgdp", quarterly("realgdp")), period=4),
    Entry("series", "unemp", series_file("unemp", quarterly("unemp")), period=4),
    Entry("series", "elnino", series_file("elnino", elnino), period=12),
    Entry("series", "electricity", electricity, period=96),
    Entry("series", "co2", series_file("co2", co2), period=52),
]
