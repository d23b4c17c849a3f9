"""The labels of a shapes-world layout for a noise-aware classifier: what each cell of the 3×3 grid holds.

Up to the objects' sizes and the background, a shapes scene (shared/SHAPES.md) is its nine cells' contents: nothing,
or one object of some colour and shape. A classifier with one head per cell over these classes
(`latentdiff.models.classifier`, `attributes=CELL_ATTRIBUTES`) reads a whole one- or two-object layout, so classifier
guidance can ask for "a red circle in the top left and nothing elsewhere" as well as for a two-object layout.

| class index k          | the cell holds                                                     |
|------------------------|--------------------------------------------------------------------|
| 0                      | nothing (``EMPTY``)                                                |
| 1 + i·\\|SHAPES\\| + j | an object of colour i of OBJECT_COLORS and shape j of SHAPES       |
| K + i                  | with the irregular classes only: an object of colour i that is no crisp shape (a dome, a   |
|                        | rounded or pinched square, a curved triangle, a blob: `latentdiff.data.irregular`)         |

K = 1 + 6 · 3 = 19 classes per cell (CELL_ATTRIBUTES), or K + 6 = 25 with the irregular classes
(IRREGULAR_CELL_ATTRIBUTES): the first K classes are the same in both, so one target layout fits either classifier.
A cell's head is named after its position with ``_`` for spaces (``top_left``). The star (reserved for the LoRA
demonstration) has no class.
"""

from __future__ import annotations

from latentdiff.data.shapes import OBJECT_COLORS, POSITIONS, SHAPES, ParsedCaption, parse_caption

EMPTY = 0
NUM_CLASSES = 1 + len(OBJECT_COLORS) * len(SHAPES)  # K
IRREGULAR = "irregular"  # the shape word of the irregular classes
NUM_CLASSES_WITH_IRREGULAR = NUM_CLASSES + len(OBJECT_COLORS)  # K + 6


def cell_attribute(position: str) -> str:
    """The head name of a cell: its position with ``_`` for spaces (``top left`` -> ``top_left``)."""
    return position.replace(" ", "_")


CELL_ATTRIBUTES: tuple[tuple[str, int], ...] = tuple((cell_attribute(p), NUM_CLASSES) for p in POSITIONS)
IRREGULAR_CELL_ATTRIBUTES: tuple[tuple[str, int], ...] = tuple(
    (cell_attribute(p), NUM_CLASSES_WITH_IRREGULAR) for p in POSITIONS
)


def object_class(color: str, shape: str) -> int:
    """k of an object (table above); a ValueError names a colour or shape the classes do not have."""
    if color not in OBJECT_COLORS or shape not in SHAPES:
        raise ValueError(
            f"no class for a {color} {shape}: the cell classes are the colours {list(OBJECT_COLORS)} times the "
            f"shapes {list(SHAPES)}"
        )
    return 1 + list(OBJECT_COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


def irregular_class(color: str) -> int:
    """K + i of an irregular object of colour i (table above); a ValueError names a colour the classes do not have."""
    if color not in OBJECT_COLORS:
        raise ValueError(f"no irregular class for {color!r}: the colours are {list(OBJECT_COLORS)}")
    return NUM_CLASSES + list(OBJECT_COLORS).index(color)


def class_name(index: int) -> str:
    """``empty``, ``{colour} {shape}`` or ``{colour} irregular`` of a class index k."""
    if not 0 <= index < NUM_CLASSES_WITH_IRREGULAR:
        raise ValueError(f"class index {index} is outside 0 … {NUM_CLASSES_WITH_IRREGULAR - 1}")
    if index == EMPTY:
        return "empty"
    if index >= NUM_CLASSES:
        return f"{list(OBJECT_COLORS)[index - NUM_CLASSES]} {IRREGULAR}"
    color, shape = divmod(index - 1, len(SHAPES))
    return f"{list(OBJECT_COLORS)[color]} {SHAPES[shape]}"


def caption_labels(caption: ParsedCaption | str) -> dict[str, int]:
    """{cell head: k} of every cell for a caption (or its text) that places every object; the other cells are empty.

    A ValueError says when an object has no position (its cell, hence the layout, is unknown) or no class.
    """
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    labels = {cell_attribute(position): EMPTY for position in POSITIONS}
    for obj in parsed.objects:
        if obj.position is None:
            raise ValueError(
                f"the {obj.color} {obj.shape} has no position, so the layout's cells are unknown; state where "
                "every object is, e.g. 'a red circle in the top left'"
            )
        labels[cell_attribute(obj.position)] = object_class(obj.color, obj.shape)
    return labels


def has_layout(text: str) -> bool:
    """Whether a caption places every object in a cell with a class (so that `caption_labels` reads it)."""
    try:
        caption_labels(text)
    except ValueError:
        return False
    return True
