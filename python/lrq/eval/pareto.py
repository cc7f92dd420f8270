"""Pareto front of (bits per weight, quality loss) points: both are to be minimised."""

from __future__ import annotations

import math
from typing import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates, sorted by x.

    Point j dominates i when x_j <= x_i and y_j <= y_i with at least one strict inequality.
    Equal points do not dominate each other (both are kept).  Points with a NaN coordinate are
    never on the front.
    """
    idx = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for i in idx:
        xi, yi = points[i]
        if not any((points[j][0] <= xi and points[j][1] <= yi)
                   and (points[j][0] < xi or points[j][1] < yi) for j in idx if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))
