"""CarRacing-v3 with the same physics, rewards and kept pixels, rendered faster.

The stock env spends most of a step in Python drawing the road: every frame it rotates, scales and
bounds-checks ~800 grass and road polygons one point at a time to draw the ~55 on screen, and renders
the dashboard text that our preprocessing crops away. This subclass:

- keeps the polygons of a track as numpy arrays (rebuilt at every reset) and transforms and culls all of
  them in one vectorised pass, with the same float64 arithmetic as pygame's `Vector2.rotate_rad`, so the
  drawn coordinates, and therefore the pixels, are identical;
- reads tile colours live (a tile's colour array is changed in place when the car first touches it);
- draws, flips and shrinks only the 700 of 800 window rows above the dashboard, reusing one window
  surface. The dashboard (the bottom 12 rows of the 96×96 state, which `env.crop.bottom` removes) is
  left black: the rest of the frame is identical to the stock env's.

`tests/test_fast_carracing.py` steps this env beside the stock one and compares every cropped frame,
reward and done: run it after upgrading gymnasium (the version range in pyproject.toml is the one
verified).
"""

from __future__ import annotations

import math

import numpy as np
import pygame
from gymnasium.envs.box2d import car_racing as cr
from gymnasium.envs.registration import register, registry
from pygame import gfxdraw

FAST_ID = "worldmodel/FastCarRacing-v3"
_DASH = int(cr.WINDOW_H * 5 / 40)  # the dashboard box: the bottom 100 of 800 rows, 12 of 96 in the state
_KEPT_ROWS = cr.STATE_H - cr.STATE_H * 5 // 40
_TWO_PI = 2 * math.pi


def _grass() -> np.ndarray:
    """The 400 grass squares of `CarRacing._render_road`, (400, 4, 2)."""
    d = cr.GRASS_DIM
    return np.array(
        [
            [(d * x + d, d * y), (d * x, d * y), (d * x, d * y + d), (d * x + d, d * y + d)]
            for x in range(-20, 20, 2)
            for y in range(-20, 20, 2)
        ],
        dtype=np.float64,
    )


class FastCarRacing(cr.CarRacing):
    _GRASS = _grass()

    def reset(self, *, seed=None, options=None):
        self._road = None  # the track changes at every reset
        return super().reset(seed=seed, options=options)

    def _render_road(self, zoom, translation, angle):
        self._draw_background(zoom, translation, angle)
        if getattr(self, "_road", None) is None:
            self._road = np.array([poly for poly, _ in self.road_poly], dtype=np.float64).reshape(-1, 4, 2)
        a = math.fmod(angle, _TWO_PI)
        if a < 0:
            a += _TWO_PI
        if math.fmod(a + 1e-6, math.pi / 2) < 2e-6:
            # pygame special-cases right angles; so does the stock renderer (rare: fall back to it).
            return super()._render_road(zoom, translation, angle)
        cos, sin = math.cos(a), math.sin(a)
        tx, ty = translation
        grass_color = self.grass_color
        for polys, colors in ((self._GRASS, None), (self._road, self.road_poly)):
            x, y = polys[..., 0], polys[..., 1]
            px = (cos * x - sin * y) * zoom + tx
            py = (sin * x + cos * y) * zoom + ty
            m = cr.MAX_SHAPE_DIM
            inside = (px >= -m) & (px <= cr.WINDOW_W + m) & (py >= -m) & (py <= cr.WINDOW_H + m)
            # Pre-flip rows below _DASH end up under the dashboard, which the crop removes.
            visible = inside.any(axis=1) & (py.max(axis=1) >= _DASH - 2)
            for i in np.flatnonzero(visible):
                poly = list(zip(px[i].tolist(), py[i].tolist()))
                color = grass_color if colors is None else [int(c) for c in colors[i][1]]
                gfxdraw.aapolygon(self.surf, poly, color)
                gfxdraw.filled_polygon(self.surf, poly, color)

    def _draw_background(self, zoom, translation, angle) -> None:
        """The playfield square. Once zoomed in it covers the whole window with a wide margin, and a plain
        fill gives the same pixels as the polygon fill at a fraction of the cost; otherwise draw as stock."""
        b = cr.PLAYFIELD
        field = [(b, b), (b, -b), (-b, -b), (-b, b)]
        corners = [pygame.math.Vector2(c).rotate_rad(angle) for c in field]
        corners = [(c[0] * zoom + translation[0], c[1] * zoom + translation[1]) for c in corners]
        if _covers_window(corners, margin=cr.MAX_SHAPE_DIM):
            self.surf.fill(self.bg_color)
        else:
            self.surf.fill((0, 0, 0))  # what a fresh pygame.Surface holds
            self._draw_colored_polygon(self.surf, field, self.bg_color, zoom, translation, angle, clip=False)

    def _render(self, mode: str):
        if mode != "state_pixels":
            return super()._render(mode)
        # The stock `_render` for state pixels, drawing only what survives the dashboard crop.
        if "t" not in self.__dict__:
            return None
        if getattr(self, "_canvas", None) is None:
            self._canvas = pygame.Surface((cr.WINDOW_W, cr.WINDOW_H))
        self.surf = self._canvas  # reused: the background covers (or is preceded by a clear of) every pixel
        angle = -self.car.hull.angle
        zoom = 0.1 * cr.SCALE * max(1 - self.t, 0) + cr.ZOOM * cr.SCALE * min(self.t, 1)
        scroll_x = -(self.car.hull.position[0]) * zoom
        scroll_y = -(self.car.hull.position[1]) * zoom
        trans = pygame.math.Vector2((scroll_x, scroll_y)).rotate_rad(angle)
        trans = (cr.WINDOW_W / 2 + trans[0], cr.WINDOW_H / 4 + trans[1])
        self._render_road(zoom, trans, angle)
        self.car.draw(self.surf, zoom, trans, angle, False)
        # Flip and shrink only the rows above the dashboard: 700 of 800 rows to 84 of 96 is the same
        # ratio, so pygame's smoothscale maps them exactly as it does inside the full frame.
        kept = pygame.transform.flip(
            self.surf.subsurface((0, _DASH, cr.WINDOW_W, cr.WINDOW_H - _DASH)), False, True
        )
        small = pygame.transform.smoothscale(kept, (cr.STATE_W, _KEPT_ROWS))
        obs = np.zeros((cr.STATE_H, cr.STATE_W, 3), np.uint8)  # the dashboard rows stay black
        obs[:_KEPT_ROWS] = pygame.surfarray.pixels3d(small).transpose(1, 0, 2)
        return obs


def _covers_window(poly: list[tuple[float, float]], margin: float) -> bool:
    """Whether the convex polygon contains the window grown by `margin` on every side."""
    window = [
        (-margin, -margin),
        (cr.WINDOW_W + margin, -margin),
        (cr.WINDOW_W + margin, cr.WINDOW_H + margin),
        (-margin, cr.WINDOW_H + margin),
    ]
    signs = set()
    for (x1, y1), (x2, y2) in zip(poly, poly[1:] + poly[:1]):
        for px, py in window:
            cross = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
            if cross == 0:
                return False
            signs.add(cross > 0)
    return len(signs) == 1


def register_fast_env() -> str:
    if FAST_ID not in registry:
        register(
            id=FAST_ID,
            entry_point="worldmodel.envs.fast_carracing:FastCarRacing",
            max_episode_steps=1000,
            reward_threshold=900,
        )
    return FAST_ID
