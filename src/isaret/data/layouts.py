"""Landmark layouts: which point is which, the groups a user can select, and left-right mirroring.

A layout is recognised from the shape of one frame:
- `holistic`: 543 MediaPipe Holistic points in the Kaggle ISLR order
  (face 0-467, left_hand 468-488, pose 489-521, right_hand 522-542);
- `hands`: two MediaPipe-ordered hands of 21 points, left then right ((2, 21, C) or (42, C));
- `hand`: one hand of 21 points;
- `points`: any other (P, C) frame, with a single group `all`;
- `flat`: frames that are plain feature vectors (F,), with no coordinates to normalise or mirror.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from isaret.errors import ConfigError

# MediaPipe face-mesh indices of the lips (the FACEMESH_LIPS contours of MediaPipe's face_mesh
# connections), listed as four contours that run from the signer's right to left, so that a
# contour read backwards is its own mirror image.
LIPS_CONTOURS = (
    (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291),  # outer upper
    (146, 91, 181, 84, 17, 314, 405, 321, 375),  # outer lower
    (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308),  # inner upper
    (95, 88, 178, 87, 14, 317, 402, 318, 324),  # inner lower
)
# Left-right pairs of the 33 MediaPipe pose points (nose 0 is its own mirror).
POSE_MIRROR_PAIRS = (
    (1, 4), (2, 5), (3, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 18), (19, 20),
    (21, 22), (23, 24), (25, 26), (27, 28), (29, 30), (31, 32),
)
HAND_POINTS = 21
HAND_MIDDLE_MCP = 9  # the base of the middle finger, used with the wrist (0) as the hand's size


@dataclass(frozen=True)
class Layout:
    name: str
    frame_shape: tuple[int, ...]
    groups: dict[str, tuple[int, ...]]
    default_groups: tuple[str, ...]
    mirror: tuple[int, ...] = ()  # mirror[i] is the point that i becomes under a horizontal flip
    shoulders: tuple[int, int] | None = None
    wrists: tuple[int, ...] = ()  # hand wrist points; each with wrist + HAND_MIDDLE_MCP for the hand size
    coords: int = 0  # coordinates per point; 0 for flat feature vectors

    @property
    def num_points(self) -> int:
        return self.frame_shape[0] if self.coords else 0


def _holistic_layout(coords: int) -> Layout:
    face, left, pose, right = 0, 468, 489, 522
    lips = tuple(sorted({index for contour in LIPS_CONTOURS for index in contour}))
    mirror = list(range(543))
    for contour in LIPS_CONTOURS:
        for a, b in zip(contour, reversed(contour)):
            mirror[face + a] = face + b
    for a, b in POSE_MIRROR_PAIRS:
        mirror[pose + a], mirror[pose + b] = pose + b, pose + a
    for i in range(HAND_POINTS):
        mirror[left + i], mirror[right + i] = right + i, left + i
    # NOTE: face points outside the lips keep their index under a flip, because no mirror
    # table of the full face mesh is included. Only the lips, pose and hands are mirrored.
    groups = {
        "face": tuple(range(face, face + 468)),
        "lips": tuple(face + i for i in lips),
        "left_hand": tuple(range(left, left + HAND_POINTS)),
        "pose": tuple(range(pose, pose + 33)),
        "pose_upper": tuple(range(pose, pose + 25)),  # head, shoulders, arms, hands and hips
        "right_hand": tuple(range(right, right + HAND_POINTS)),
    }
    return Layout(
        name="holistic",
        frame_shape=(543, coords),
        groups=groups,
        default_groups=("left_hand", "right_hand", "pose_upper", "lips"),
        mirror=tuple(mirror),
        shoulders=(pose + 11, pose + 12),
        wrists=(left, right),
        coords=coords,
    )


def _hands_layout(coords: int) -> Layout:
    mirror = tuple(list(range(HAND_POINTS, 2 * HAND_POINTS)) + list(range(HAND_POINTS)))
    return Layout(
        name="hands",
        frame_shape=(2 * HAND_POINTS, coords),
        groups={"left_hand": tuple(range(HAND_POINTS)), "right_hand": tuple(range(HAND_POINTS, 2 * HAND_POINTS))},
        default_groups=("left_hand", "right_hand"),
        mirror=mirror,
        wrists=(0, HAND_POINTS),
        coords=coords,
    )


def detect_layout(frame_shape: tuple[int, ...]) -> Layout:
    """Recognise the layout from the shape of one frame (without the time axis)."""
    if len(frame_shape) == 1:
        return Layout(name="flat", frame_shape=frame_shape, groups={"all": tuple(range(frame_shape[0]))},
                      default_groups=("all",))
    if len(frame_shape) == 3 and frame_shape[:2] == (2, HAND_POINTS):
        frame_shape = (2 * HAND_POINTS, frame_shape[2])
    if len(frame_shape) != 2:
        raise ValueError(f"frames shaped {frame_shape} are not (points, coords) or (features,)")
    points, coords = frame_shape
    if coords not in (2, 3):
        raise ValueError(f"frames shaped {frame_shape} have {coords} coordinates per point; expected 2 or 3")
    if points == 543:
        return _holistic_layout(coords)
    if points == 2 * HAND_POINTS:
        return _hands_layout(coords)
    if points == HAND_POINTS:
        return Layout(name="hand", frame_shape=frame_shape, groups={"hand": tuple(range(HAND_POINTS))},
                      default_groups=("hand",), mirror=tuple(range(HAND_POINTS)), wrists=(0,), coords=coords)
    return Layout(name="points", frame_shape=frame_shape, groups={"all": tuple(range(points))},
                  default_groups=("all",), mirror=tuple(range(points)), coords=coords)


@dataclass(frozen=True)
class Selection:
    """The points and coordinates kept from a layout, and how they map under a flip."""

    layout: Layout
    groups: tuple[str, ...]
    points: np.ndarray  # indices into the layout, in feature order
    coord_count: int  # coordinates kept per point (0 for flat layouts)
    mirror: np.ndarray = field(repr=False)  # mirror[i]: position in `points` that point i becomes under a flip

    @property
    def feature_dim(self) -> int:
        return len(self.points) * self.coord_count if self.coord_count else len(self.points)

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.name,
            "frame_shape": list(self.layout.frame_shape),
            "groups": list(self.groups),
            "points": [int(i) for i in self.points],
            "coord_count": self.coord_count,
            "feature_dim": self.feature_dim,
        }


def select_landmarks(layout: Layout, landmarks: str, coords: str) -> Selection:
    """Resolve the `landmarks` config value ('default', 'all' or group names) for this layout."""
    names = [name.strip() for name in landmarks.split(",") if name.strip()]
    if names == ["default"]:
        names = list(layout.default_groups)
    elif names == ["all"]:
        names = list(layout.groups) if layout.name != "holistic" else ["face", "left_hand", "pose", "right_hand"]
    unknown = [name for name in names if name not in layout.groups]
    if unknown or not names:
        raise ConfigError(
            f"invalid value {landmarks!r} for 'landmarks': the {layout.name} layout has the groups "
            f"{', '.join(layout.groups)} (or use 'default' or 'all')"
        )
    points: list[int] = []
    for name in names:
        points.extend(i for i in layout.groups[name] if i not in points)
    points_array = np.asarray(points, dtype=np.int64)
    position = {point: i for i, point in enumerate(points)}
    if layout.mirror:
        mirror = np.asarray([position.get(layout.mirror[p], i) for i, p in enumerate(points)], dtype=np.int64)
    else:
        mirror = np.arange(len(points))
    coord_count = 0 if layout.coords == 0 else min(layout.coords, len(coords))
    return Selection(layout=layout, groups=tuple(names), points=points_array, coord_count=coord_count,
                     mirror=mirror)


def _reference(frames: np.ndarray, layout: Layout) -> tuple[np.ndarray | None, float | None]:
    """Return the clip's centre (xy) and scale from the shoulders, else the wrists, else None."""
    with np.errstate(invalid="ignore"):
        if layout.shoulders is not None:
            left, right = frames[:, layout.shoulders[0], :2], frames[:, layout.shoulders[1], :2]
            both = np.isfinite(left).all(axis=1) & np.isfinite(right).all(axis=1)
            if both.any():
                centre = ((left[both] + right[both]) / 2).mean(axis=0)
                scale = float(np.linalg.norm(left[both] - right[both], axis=1).mean())
                if scale > 1e-6:
                    return centre, scale
        wrist_points, sizes = [], []
        for wrist in layout.wrists:
            base, mcp = frames[:, wrist, :2], frames[:, wrist + HAND_MIDDLE_MCP, :2]
            seen = np.isfinite(base).all(axis=1) & np.isfinite(mcp).all(axis=1)
            wrist_points.append(base[seen])
            sizes.append(np.linalg.norm(base[seen] - mcp[seen], axis=1))
        if wrist_points and sum(len(w) for w in wrist_points):
            centre = np.concatenate(wrist_points).mean(axis=0)
            scale = float(np.concatenate(sizes).mean())
            if scale > 1e-6:
                return centre, scale
    return None, None


def normalize_clip(frames: np.ndarray, layout: Layout) -> np.ndarray:
    """Centre and scale a (T, P, C) clip on its body reference.

    The reference is the mean shoulder midpoint and shoulder width over the clip, else the mean
    wrist position and hand size (wrist to middle-finger base), else the mean and spread of all
    visible points. Only x and y set the reference; every coordinate is divided by the scale.
    """
    centre, scale = _reference(frames, layout)
    if centre is None:
        visible = frames[..., :2][np.isfinite(frames[..., :2]).all(axis=-1)]
        centre = visible.mean(axis=0)
        spread = float(visible.std(axis=0).mean()) if len(visible) > 1 else 0.0
        scale = spread if spread > 1e-6 else 1.0
    out = frames.astype(np.float32, copy=True)
    out[..., :2] -= centre.astype(np.float32)
    if out.shape[-1] > 2:
        # Depth is centred on the clip's own mean so that sensors with an absolute depth axis
        # (a Leap Motion's millimetres above the device) and MediaPipe's relative z agree.
        depth = out[..., 2:][np.isfinite(out[..., 2:])]
        if depth.size:
            out[..., 2:] -= depth.mean()
    out /= np.float32(scale)
    return out
