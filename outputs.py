"""What the scripts write, and where: output folders (one command at a time, never inside what the command reads,
a record of what made them), files written atomically, checkpoints, the split files, masks as palette PNGs and
pictures with a legend; and how a script ends: one line for a user's mistake or an interrupt, never a traceback."""
import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont

import common
from common import UserError

RECORD, LOCK = "run.json", "run.lock"  # in every output folder: what made it; while a command writes there: who
ROUNDS = "labeled_rounds.csv"  # beside a run's labeled.txt: each labelled image's labelling round
interrupt_note = "the same command again starts over"  # what Ctrl-C prints; the scripts keep it true as they go
held_locks = []  # (folder, lock file descriptor, whether this command made the folder)


# ============================================================================= how a script ends

def run_main(main):
    """Run a script's main(): a UserError (also one raised in a DataLoader worker), an OSError, running out of memory
    and an interrupt (Ctrl-C, or SIGTERM as `kill` and schedulers send) each become one line and a non-zero exit."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM is handled as Ctrl-C
    try:
        main()
    except UserError as e:  # a worker's error comes with the worker's traceback in its text: keep the last line
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1])
    except OSError as e:  # a file that vanished or became unreadable after the checks at the start
        sys.exit(f"error: {e.filename or 'a file'}: {e.strerror or str(e).strip().splitlines()[-1]}")
    except MemoryError:
        sys.exit("error: out of memory; use smaller images, batches or sizes")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {interrupt_note}")
    finally:
        release_locks()
        if dist.is_initialized():  # under torchrun: left to the interpreter's exit, its threads may abort the process
            dist.destroy_process_group()


# ============================================================================= files

def atomic_write(path, write_fn):
    """Write a file through write_fn(temporary path), then rename it into place: never half a file. A failed write
    (a full disk, a read-only folder) is one line naming the file, and leaves nothing half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UserError(f"cannot write {path}: its name is too long for the file system; rename the image or "
                            "folder it is named after") from None
        advice = "free space on its disk" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix that"
        raise UserError(f"cannot write {path}: {e.strerror or e}; {advice}, then run the same command again") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def remove_stale_temporaries(paths):
    """Remove what a killed atomic_write of one of `paths` left (<path>.tmp<pid>, its process gone), and nothing
    else: a folder may hold a user's own files, or another run's."""
    wanted = {}
    for path in paths:
        wanted.setdefault(os.path.dirname(path) or ".", set()).add(os.path.basename(path))
    for folder, names in wanted.items():
        for entry in os.scandir(folder) if os.path.isdir(folder) else []:
            found = re.fullmatch(r"(.+)\.tmp(\d+)", entry.name)
            if found and found[1] in names and not process_runs(int(found[2])):
                os.remove(entry.path)


def process_runs(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and is another user's
        return True
    return True


def json_text(obj, indent=2):
    """JSON without NaN or infinity (which strict readers refuse): they are written as null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(clean(obj), indent=indent, allow_nan=False) + "\n"


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj):
    write_text(path, json_text(obj))


def write_ids(out, split):
    """A run's split files: {name: ids} as <name>.txt, an id a line, sorted."""
    for name, ids in split.items():
        write_text(os.path.join(out, f"{name}.txt"), "".join(f"{i}\n" for i in sorted(ids)))


def write_rounds(out, labeled, rounds):
    """labeled_rounds.csv: each labelled image and its labelling round in `rounds` (1 where not given: the first
    split; stage1_train.py's --add-labeled adds one)."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["id", "round"])
    writer.writerows((i, rounds.get(i, 1)) for i in sorted(labeled))
    write_text(os.path.join(out, ROUNDS), table.getvalue())


def read_rounds(folder):
    """{id: labelling round} of a run folder's labelled images: its labeled_rounds.csv, else (written before
    rounds were) round 1 for every id of its labeled.txt."""
    path = os.path.join(folder, ROUNDS)
    if not os.path.exists(path):
        return {image_id: 1 for image_id in common.read_lines(os.path.join(folder, "labeled.txt"))}
    with open(path, newline="", encoding="utf-8") as f:
        return {row["id"]: int(row["round"]) for row in csv.DictReader(f)}


def val_of_run(folder, data_root):
    """The val of the run in `folder`, (ids, its val.txt), which the commands that continue the run (its later stages,
    a resumed run, the next labelling round) keep where the data has no val list of its own, so that new masks do not
    change it; None where there is no folder or no val.txt, or its run was made on other data than data_root."""
    if folder is None:
        return None
    path = os.path.join(folder, "val.txt")
    try:
        made_on = record_of(folder)["recipe"]["data_root"]
    except (KeyError, TypeError):  # no record, or not one of a run
        return None
    return (common.read_lines(path), path) if made_on == os.path.realpath(data_root) and os.path.isfile(path) else None


def check_names(ids):
    """Before any work: the files named after each image id (<id>.png, <id>.npy, while written <id>.png.tmp<pid>)
    must fit in a file name's 255 bytes."""
    for image_id in ids:
        length = len((os.path.basename(image_id) + ".png.tmp" + "0" * 7).encode())
        if length > 255:
            raise UserError(f"the image {image_id} has a name too long for the files named after it ({length} bytes "
                            "of at most 255, with .png.tmp<pid>); rename it")


def pseudo_mask_path(folder, image_id):
    """Where stage2_pseudolabel.py writes an image's pseudo-mask in its --out."""
    return os.path.join(folder, "masks", f"{image_id}.png")


def save_mask_png(path, mask, palette):
    """A mask as a palette PNG: class indices, shown in the classes' colours."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(palette)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path):
    """A file's content in a record (a folder that moves keeps its runs): the start of its SHA-256."""
    return "sha256:" + file_sha256(path)[:16]


# ============================================================================= output folders

def clashing(names, suffixes):
    """The names whose output files (name + a suffix) would also be a folder of another output."""
    folders = {str(parent) for name in names for parent in Path(name).parents}
    return [name for name in names if any(name + suffix in folders for suffix in suffixes)]


def is_inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder).rstrip(os.sep)
    return path == folder or path.startswith(folder + os.sep)


def input_folder(path):
    """The folder an input stands for: itself, or a file's folder (a checkpoint.pt's run folder)."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def open_output(folder, flag, script, reads=(), own_files=()):
    """Claim `script`'s output folder: refused inside what the command reads or holding it, if it holds another
    script's files, or while another command writes there; what a killed write of one of `own_files` (the files the
    command writes there) left is removed. Returns its record (None: new or empty)."""
    for source in reads:
        if is_inside(folder, source) or is_inside(source, folder):
            where = "is inside" if is_inside(folder, source) else "holds"
            raise UserError(f"{flag} {folder} {where} {source}, which this command reads; choose a folder apart "
                            "from its inputs")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file, not a folder")
    first = int(os.environ.get("RANK", 0)) == 0
    if first:  # under torchrun the first process claims it for the group
        lock_folder(folder, flag)
    if os.path.isfile(os.path.join(folder, RECORD)):
        record = read_record(folder, flag, script)
        if first:
            remove_stale_temporaries(own_files)
        return record
    others = sorted(set(os.listdir(folder)) - {LOCK}) if os.path.isdir(folder) else []
    if others:
        raise UserError(f"{flag} {folder} holds files that {script} did not write ({others[0]}, ...); choose a new or "
                        "empty folder")
    return None


def lock_folder(folder, flag):
    """Hold `folder`'s lock until this process ends: another command writing there is refused, naming the process
    that holds it. The kernel releases the lock of a process that ends, even killed: none is ever stale."""
    created, path = not os.path.isdir(folder), os.path.join(folder, LOCK)
    while True:
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{flag} {folder}: cannot write there ({e.strerror}); choose another folder") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a process's own: its loader processes do not inherit it
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 400).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{flag} {folder} is in use by {holder}; wait for it to end, or choose another "
                            "folder") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break  # else the process that held it removed it meanwhile: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} ({' '.join(sys.argv)[:200]}), since {time.ctime()}".encode())
    held_locks.append((folder, fd, created))


def release_locks():
    """Remove this command's lock files, and the folders it made and left empty."""
    while held_locks:
        folder, fd, created = held_locks.pop()
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, LOCK))
            if created:
                os.rmdir(folder)  # only if empty
        os.close(fd)


def record_of(folder):
    """A folder's run.json, what made it; {} where there is none, or it is damaged."""
    try:
        record = json.loads(Path(folder, RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_record(folder, flag, script):
    record = record_of(folder)
    if record.get("script") != script:
        raise UserError(f"{flag} {folder} holds no outputs of {script} (its {RECORD} is missing, damaged or another "
                        "script's); choose another folder")
    return record


def check_same_recipe(recorded, recipe, folder, advice):
    """Refuse to continue or redo a run of another recipe in `folder`, naming the first setting that differs."""
    for key in sorted(set(recorded) | set(recipe)):
        if recorded.get(key) != recipe.get(key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{folder} was made with {flag} {recorded.get(key)}, this command asks for "
                            f"{flag} {recipe.get(key)}; {advice}")


# ============================================================================= checkpoints

def load_checkpoint(path, flag="--checkpoint"):
    """(checkpoint, its path), from a file or a run folder, loaded without unpickling arbitrary objects."""
    if os.path.isfile(os.path.join(path, "checkpoint.pt")):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} not found" + (" (a folder without checkpoint.pt)" * os.path.isdir(path)))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, a pickle with foreign objects, a truncated file...
        raise UserError(f"{flag} {path} is not a checkpoint of this project, or is damaged: it cannot be loaded "
                        "with weights_only=True (nothing in it was unpickled)") from None
    if not isinstance(checkpoint, dict) or {"model", "args", "labeled", "unlabeled", "class_names"} - set(checkpoint):
        raise UserError(f"{flag} {path} is not a checkpoint of this project (stage1_train.py or stage3_multitask.py)")
    return checkpoint, path


def save_checkpoint(out, step, **state):
    """checkpoint.pt: `state` and the random state, through memory and then atomically, so that a full disk is a
    clear error (torch's own file writer says only 'unexpected pos') and never leaves half a checkpoint."""
    global interrupt_note
    state["rng_state"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    buffer = io.BytesIO()
    torch.save({"step": step, **state}, buffer)
    atomic_write(os.path.join(out, "checkpoint.pt"), lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))
    interrupt_note = f"the same command continues from step {step}, the last checkpoint"


# ============================================================================= pictures

def overlay(image, mask, palette, alpha=0.45):
    """An image with each class of the mask (background too) tinted in its palette colour and outlined in it, so
    that neighbouring classes stay apart on colourful images; 255 (ignore) white."""
    classes = [int(c) for c in mask.unique()]
    if not classes:
        return image
    colours = [(255, 255, 255) if c == common.IGNORE else tuple(palette[3 * c:3 * c + 3]) for c in classes]
    regions = torch.stack([mask == c for c in classes])
    inner = -F.max_pool2d(-regions[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0  # eroded by a pixel
    tinted = torchvision.utils.draw_segmentation_masks(image, regions, alpha, colours)
    return torchvision.utils.draw_segmentation_masks(tinted, regions & ~inner, 1.0, colours)


def with_legend(picture, classes, names, palette):
    """A PIL picture with a legend below it: a swatch in its colour and the name of each class in `classes`."""
    font = ImageFont.load_default()
    entries = [("ignore (255)" if c == common.IGNORE else names[c],
                (255, 255, 255) if c == common.IGNORE else tuple(palette[3 * c:3 * c + 3])) for c in classes]
    width = max(picture.width, 320)
    measure = ImageDraw.Draw(picture)
    rows, row, x = [], [], 4
    for name, colour in entries:  # wrap the entries into rows as wide as the picture
        size = 18 + measure.textbbox((0, 0), name, font=font)[2] + 12
        if row and x + size > width:
            rows, row, x = rows + [row], [], 4
        row.append((x, name, colour))
        x += size
    rows += [row] if row else []
    sheet = Image.new("RGB", (width, picture.height + 18 * len(rows) + 6), "white")
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = picture.height + 4 + 18 * r
        for x, name, colour in row:
            draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour, outline="black")
            draw.text((x + 18, y + 2), name, fill="black", font=font)
    return sheet
