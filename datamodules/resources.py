"""Named resource files (BackdoorBench's trigger pictures and LF patterns), fetched once into the data folder.

Each resource has a name (`hello_kitty`, `badnet_trigger`, `lf_cifar10_preactresnet18`, ...), a path inside
the data folder that mirrors BackdoorBench's `resource/` layout under `triggers/` (e.g.
`<data_dir>/triggers/blended/hello_kitty.jpeg`), a download URL pinned to one BackdoorBench commit, and its
sha256. `resolve(name, data_dir)` returns the file's path: a file already there is checked against its sha256
(a mismatch is an error, never silently replaced); a missing one is downloaded (a temp file in the same folder,
checked, then renamed into place, so a crash or a concurrent worker never leaves half a file), or, offline,
the error says which file to put where, where to get it and its sha256.
`python -m datamodules.prepare triggers --data_dir data` fetches all of them.

The files are BackdoorBench's (CC BY-NC 4.0), used as data; nothing of its code is copied.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

BACKDOORBENCH_COMMIT = "f02e3534645f0ee63d6848653062cd6c0d6c400d"
BASE_URL = f"https://raw.githubusercontent.com/SCLBD/BackdoorBench/{BACKDOORBENCH_COMMIT}/resource/"
FOLDER = "triggers"  # inside the data folder; holds BackdoorBench's resource/ layout
TIMEOUT_S = 60.0
MAX_BYTES = 16 * 2**20  # the largest file is 49 KB: anything much larger is not the file


@dataclass(frozen=True)
class Resource:
    """One file: `upstream` is its path under BackdoorBench's resource/ (and under <data_dir>/triggers/)."""

    name: str
    upstream: str
    sha256: str
    what: str

    @property
    def relative_path(self) -> str:
        """Where it lives inside a data folder."""
        return f"{FOLDER}/{self.upstream}"

    @property
    def url(self) -> str:
        return BASE_URL + self.upstream  # read at call time, so a mirror can be set by changing BASE_URL

    def path(self, data_dir: str | os.PathLike) -> Path:
        """<data_dir>/triggers/<upstream>, as an absolute path (what error messages name)."""
        return Path(os.path.abspath(data_dir)) / self.relative_path


# sha256 sums from ../shared/data/triggers/README.md (BackdoorBench commit above).
_LF_SUMS = {
    "cifar100_convnext_tiny": "73f2294ba7b826d26dbdb8cd7039f79736de2ab2ec39652a6981222f6cfb924c",
    "cifar100_densenet161": "b4ed6ec24033b05db34de1eaef70c850ff59c2075134960331fca9e2cad2a0a9",
    "cifar100_efficientnet_b3": "d4acfadf07e60f265f25863e8473f3bd7644fb1894b07ba159ba79fb16ff28cb",
    "cifar100_mobilenet_v3_large": "9bc282c6d0ece5a60a9ee0eab4b46912af4647e5780c1f9b50e35dae8fc48e55",
    "cifar100_preactresnet18": "40dfe0435ebb7d070674eb11b225c882fbce32887f6d8c50156e8a5e6103e628",
    "cifar100_vgg19": "d63b8f9d0ca1be28c58a91521599adaef5002ae9e73d9b33f175ef3efa7bf0e5",
    "cifar100_vgg19_bn": "646d3a0dab526dbd8a6b884c5d346d74c3181dd013b2ffb109922d08cb01561f",
    "cifar100_vit_b_16": "5a284146923745b9176769b94f5231980bcc4a65539660bd74749a7317f248cb",
    "cifar10_convnext_tiny": "9619bb2e2fe3b17404ae5fd2771d95ecee5715b4ff572a45348004596329b654",
    "cifar10_densenet161": "fd2ca606061b7e275206d6a3e5c03357ebd037f62023fb9f0c32180b1ad5df76",
    "cifar10_efficientnet_b3": "27cdd07d18ddbb836cfe4550383e6390d99dec9b1ad6e1529795063791b65f8d",
    "cifar10_mobilenet_v3_large": "d2da2fbab8ad8ce7f5c95705bcc3908b064dad8a6bac9095ad7ac1532e2f7ccd",
    "cifar10_preactresnet18": "743f28f41ff088544b8f26663f6fb2663c033184166b917c8934f7df73e47142",
    "cifar10_vgg19": "2943bdb33f458012e39fc54c6e350873e9f5e2f20dfc1a5a3008ab477afa5850",
    "cifar10_vgg19_bn": "32292b32eee90df298f9e58205c547aacb29f9d1de9cbcf3db6a651f4ed358dc",
    "cifar10_vit_b_16": "0ec78d5630bc85876fb701c16b20b25e39440d636fcdf74e322519f42f936153",
    "gtsrb_convnext_tiny": "15e9cda76fdfb583ef77cbd08df8c3c4033d68c02540103191be59b2e9f33a81",
    "gtsrb_densenet161": "d8dd21162980304dfadea262d7c293741ff7f191893cb3bfc626110bf75836c9",
    "gtsrb_efficientnet_b3": "8eef07a78253930b1d27c94a57237dca9e64fdeb103801e2efbcd6543a1ad53c",
    "gtsrb_mobilenet_v3_large": "1f4ca37facacc1100a54ae931133589558fef69c5b7e6f663dae8711a40341d5",
    "gtsrb_preactresnet18": "e45e28d23f16eecb5fd1067b9ab3dd386ec029d1b84af875a4f222cf11ffc317",
    "gtsrb_vgg19": "0749bd90869f8c53f5c4d5ae7b5f2585abb0c7cfca6127ac14b89b478be0e48f",
    "gtsrb_vgg19_bn": "35d08f3a4da6b7daebad1c800dd690ded80a2b431cc402a3db6fbbc55edcdb9c",
    "gtsrb_vit_b_16": "5bbafd8fd32d52f43dad549f76f660de46f432f33dd61df24fc4f0a8698baec7",
    "tiny_convnext_tiny": "c33ee5fe195baea180ab7065cd88ab6a3021d17f8276f87d6ad2c06d5e1602c0",
    "tiny_densenet161": "8844a88b832e5a67db079e1802195be06d53f81f1bb5d956480a5d0b86e770f4",
    "tiny_efficientnet_b3": "d4e8b38ff6be7dee0d04e5240ece0cda824eba83439dd61aef09174cb0c4f9e0",
    "tiny_mobilenet_v3_large": "a16d9e001f63f655d533788a6ac05831f18dd6938e98e325f4e1d170649ae736",
    "tiny_preactresnet18": "098be74494a9a0b92cc2219f796d0a790a9dd7aa042922d2febf7e162e13a1ea",
    "tiny_vgg19": "dbe6ccc4efb19e4b8a53abb6203893f687edf55b495f666619981cb72a17cd76",
    "tiny_vgg19_bn": "a167d7ca11d7f2ca2387a21d18ccc6fbf114fd45133c03c76d2d7e92c4c04b76",
    "tiny_vit_b_16": "3fe87bf92dcfba79c65645c6f55d6ce9f8b744da3beb1e7b497e1a59fcea59ac",
}
# BackdoorBench names this one `_0_225` (sic)
_LF_FILE = {k: f"{k}_0_225.npy" if k == "cifar100_convnext_tiny" else f"{k}_0_255.npy" for k in _LF_SUMS}


def _registry() -> dict[str, Resource]:
    found = [
        Resource("hello_kitty", "blended/hello_kitty.jpeg",
                 "10f470812922a1b22d34755f491b23f2cabc6e32f236a26e48d2dddd396ae2b3",
                 "Blended trigger picture (JPEG 314x380)"),
        Resource("badnet_trigger", "badnet/trigger_image.png",
                 "6f97bd2f498c3bfec84f6183861c85cc9585626d0b77ade6224b9ad5815f6991",
                 "BadNets trigger picture (32x32, 3x3 white square bottom-right)"),
        Resource("badnet_trigger_grid", "badnet/trigger_image_grid.png",
                 "eae6cf9f468f4d8c3fee9b47b292f0fac50a1c9de22004a4f96d88162aaacc88",
                 "BadNets grid trigger picture (32x32)"),
    ]
    found += [Resource(f"lf_{k}", f"lowFrequency/{_LF_FILE[k]}", digest, f"LF pattern for {k.replace('_', ' ', 1)}")
              for k, digest in sorted(_LF_SUMS.items())]
    return {r.name: r for r in found}


RESOURCES: dict[str, Resource] = _registry()


def is_resource(value: object) -> bool:
    """Whether `value` is a registered resource name (what the triggers' `image` / `pattern` accept)."""
    return isinstance(value, str) and value in RESOURCES


def get(name: str) -> Resource:
    try:
        return RESOURCES[name]
    except KeyError:
        raise ValueError(f"unknown resource {name!r}; registered: {', '.join(RESOURCES)}") from None


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def where_to_get(resource: Resource, target: Path) -> str:
    """The instructions every error ends with: which file to put where, where to get it, its sha256."""
    return (f"Put the file at {target}: download {resource.url} (BackdoorBench's resource/{resource.upstream} at "
            f"commit {BACKDOORBENCH_COMMIT}), sha256 {resource.sha256}; or run `python -m datamodules.prepare "
            f"triggers --data_dir <dir>` on a machine with internet access and copy <dir>/{FOLDER}/ into "
            f"{target.parents[len(Path(resource.relative_path).parts) - 1]}.")


def verify(resource: Resource, path: Path) -> None:
    found = sha256_of(path)
    if found != resource.sha256:
        raise ValueError(
            f"resource {resource.name!r}: {path} has sha256 {found}, expected {resource.sha256} (a corrupted, "
            f"truncated or different file). Delete it and fetch it again: `python -m datamodules.prepare triggers "
            f"--data_dir <dir>` downloads it from {resource.url}.")


def download(resource: Resource, target: Path, timeout: float = TIMEOUT_S) -> None:
    """Fetch `resource` into `target`: a temp file in the same folder, sha256-checked, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, urlopen(resource.url, timeout=timeout) as response:
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > MAX_BYTES:
                    raise ValueError(f"{resource.url} is larger than {MAX_BYTES} bytes: not the expected file")
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != resource.sha256:
            raise ValueError(f"the file downloaded from {resource.url} has sha256 {h.hexdigest()}, expected "
                             f"{resource.sha256}")
        os.replace(tmp, target)  # atomic within one folder
    finally:
        tmp.unlink(missing_ok=True)


def ensure(name: str, data_dir: str | os.PathLike = "data", download_missing: bool = True) -> tuple[Path, str]:
    """(path, how): the checked file and "present" or "downloaded". Raises FileNotFoundError when it is
    missing and cannot be fetched, ValueError when the file there has the wrong sha256."""
    resource = get(name)
    target = resource.path(data_dir)
    if target.is_file():
        verify(resource, target)
        return target, "present"
    if not download_missing:
        raise FileNotFoundError(f"resource {name!r} ({resource.what}) not found at {target} (downloading is "
                                f"disabled). {where_to_get(resource, target)}")
    try:
        download(resource, target)
    except Exception as err:  # noqa: BLE001 - any failure (offline, HTTP, checksum) ends in the same advice
        raise FileNotFoundError(
            f"resource {name!r} ({resource.what}) not found at {target}, and downloading it failed "
            f"({type(err).__name__}: {err}). {where_to_get(resource, target)}") from err
    return target, "downloaded"


def resolve(name: str, data_dir: str | os.PathLike = "data", download_missing: bool = True) -> Path:
    """The checked path of resource `name` inside `data_dir`, downloading it once when missing."""
    return ensure(name, data_dir, download_missing)[0]


def resolve_file(value: str, data_dir: str | os.PathLike, what: str) -> str:
    """A trigger's file argument: a registered resource name (resolved in `data_dir`) or a plain path."""
    if is_resource(value):
        return str(resolve(value, data_dir))
    if not Path(value).is_file():
        raise FileNotFoundError(f"{what} {value!r} is neither a file nor a registered resource name "
                                f"(e.g. {', '.join(list(RESOURCES)[:3])}, lf_<dataset>_<model>; see "
                                f"datamodules/resources.py)")
    return value
