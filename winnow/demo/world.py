"""The synthetic demo world: rendered scenes of shapes and the captions the web writes for them.

A scene is a few objects of one shape and colour (count, size) on a background. The same renderer
draws the pool, the trusted subset and the evaluation tasks, each from its own seeded random stream,
so evaluation images never appear in the pool.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross"]
# Shapes the web draws but no demo task asks about: the pool's off-task concepts (pool.concepts).
OFF_TASK_SHAPES = ["hexagon", "pentagon", "arrow"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (15, 15, 15),
}
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (30, 30, 30), "beige": (225, 205, 160)}
COUNT_WORDS = ["one", "two", "three", "four"]
SIZES = ["small", "large"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "star": "stars", "cross": "crosses", "hexagon": "hexagons", "pentagon": "pentagons", "arrow": "arrows"}

# Words that appear on signs; the trusted set teaches the scorer to read them (as web data teaches
# CLIP), so pool images whose caption only parrots their scene text score high unless flipped.
# Eight short words, drawn large (TEXT_SCALE): few enough that the demo's tiny scorer learns to
# read them in its 16 epochs (with 16 words of up to 6 letters it never did: word accuracy at chance).
SIGN_WORDS = ["sale", "open", "stop", "taxi", "bank", "exit", "shop", "cafe"]
TEXT_SCALE = 3          # the text's height is the image side / TEXT_SCALE
# How the web captions an image whose text it copies: the text in a phrase, alone, or repeated
# (most pass the caption-length and language checks, and read like the signs the scorer learnt on).
PARROT = ["a sign that says {w}", "the word {w}", "the {w} sign", "{w} sign on the wall", "{W}!", "{w} {w} {w}"]

EN_TEMPLATES = [
    "a photo of {count} {colour} {shapes} on a {bg} background",
    "{count} {size} {colour} {shapes}",
    "{count} {colour} {shapes} on {bg}",
    "clip art of {count} {colour} {shapes}",
    "a picture showing {count} {size} {colour} {shapes} on a {bg} background",
    "stock image: {count} {colour} {shapes}, {bg} backdrop",
]
# Alt text that names only part of a clean scene inside boilerplate (pool.loose_captions): the loosely
# aligned pairs web pools are full of. A scorer trained on full descriptions rates them below a
# caption that spells out an image's text, as OpenAI CLIP rates LAION's parrots above plain photos.
LOOSE_TEMPLATES = [
    "{colour} {shapes} vector illustration, free download",
    "{shapes} icon pack - buy online",
    "{colour} geometric design for your wall, stock art",
    "set of {shapes}, royalty free image",
    "cute {colour} pattern, printable wallpaper",
]

# Non-English captions of the same scenes (the web's other languages); grammar kept simple.
FOREIGN = {
    "de": ("ein Foto von {count} {colour} Formen auf einem {bg} Hintergrund mit {shapes}",
           {"one": "eins", "two": "zwei", "three": "drei", "four": "vier"},
           {"red": "roten", "green": "grünen", "blue": "blauen", "yellow": "gelben", "purple": "lila",
            "orange": "orangen", "white": "weißen", "black": "schwarzen"},
           {"circle": "Kreisen", "square": "Quadraten", "triangle": "Dreiecken", "diamond": "Rauten",
            "star": "Sternen", "cross": "Kreuzen",
            "hexagon": "Sechsecken", "pentagon": "Fünfecken", "arrow": "Pfeilen"},
           {"white": "weißen", "gray": "grauen", "black": "schwarzen", "beige": "beigen"}),
    "fr": ("une photo de {count} {shapes} {colour} sur un fond {bg}, très jolie image",
           {"one": "un", "two": "deux", "three": "trois", "four": "quatre"},
           {"red": "rouges", "green": "verts", "blue": "bleus", "yellow": "jaunes", "purple": "violets",
            "orange": "orange", "white": "blancs", "black": "noirs"},
           {"circle": "cercles", "square": "carrés", "triangle": "triangles", "diamond": "losanges",
            "star": "étoiles", "cross": "croix",
            "hexagon": "hexagones", "pentagon": "pentagones", "arrow": "flèches"},
           {"white": "blanc", "gray": "gris", "black": "noir", "beige": "beige"}),
    "es": ("una foto de {count} {shapes} {colour} sobre un fondo {bg}, imagen de alta calidad",
           {"one": "uno", "two": "dos", "three": "tres", "four": "cuatro"},
           {"red": "rojos", "green": "verdes", "blue": "azules", "yellow": "amarillos", "purple": "morados",
            "orange": "naranjas", "white": "blancos", "black": "negros"},
           {"circle": "círculos", "square": "cuadrados", "triangle": "triángulos", "diamond": "rombos",
            "star": "estrellas", "cross": "cruces",
            "hexagon": "hexágonos", "pentagon": "pentágonos", "arrow": "flechas"},
           {"white": "blanco", "gray": "gris", "black": "negro", "beige": "beige"}),
    "it": ("una foto di {count} {shapes} {colour} su uno sfondo {bg}, immagine gratis",
           {"one": "uno", "two": "due", "three": "tre", "four": "quattro"},
           {"red": "rossi", "green": "verdi", "blue": "blu", "yellow": "gialli", "purple": "viola",
            "orange": "arancioni", "white": "bianchi", "black": "neri"},
           {"circle": "cerchi", "square": "quadrati", "triangle": "triangoli", "diamond": "rombi",
            "star": "stelle", "cross": "croci",
            "hexagon": "esagoni", "pentagon": "pentagoni", "arrow": "frecce"},
           {"white": "bianco", "gray": "grigio", "black": "nero", "beige": "beige"}),
}
UNINFORMATIVE = ["IMG_{n}.jpg", "image", "photo", "DSC{n}.JPG", "untitled-{n}", "thumbnail", "{n}.png",
                 "screenshot", "pic"]
DOMAINS = ["cdn.shopify.example", "i.pinimg.example", "images.stock.example", "blog.example.org",
           "media.news.example", "static.wiki.example", "upload.forum.example", "img.market.example"]


@dataclass
class Scene:
    shape: str
    colour: str
    count: int          # 1..4
    size: str           # small | large
    background: str
    text: str | None = None   # scene text painted on the image (signs)
    outline: bool = False     # drawn as outline only (distribution-shifted style)

    @staticmethod
    def random(rng: np.random.Generator, concepts: "Concepts | None" = None) -> "Scene":
        """A uniform scene (the tasks' distribution), or one from the pool's ``concepts``."""
        if concepts is None:
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        else:
            colour, shape = concepts.draw(rng)
        bgs = [b for b in BACKGROUNDS if b != colour]
        return Scene(shape=shape, colour=colour, count=int(rng.integers(1, 5)),
                     size=str(rng.choice(SIZES)), background=str(rng.choice(bgs)))


class Concepts:
    """The pool's concept distribution, shifted from the tasks' uniform one as web data is:
    (colour, shape) pairs ranked in a fixed random order have probability ∝ rank^-zipf (head
    concepts redundant, tail ones rare), and a share ``off_task`` of scenes show shapes no task
    asks about."""

    def __init__(self, zipf: float, off_task: float, seed: int):
        pairs = [(c, s) for c in COLOURS for s in SHAPES]
        order = np.random.default_rng([seed, 5]).permutation(len(pairs))
        self.pairs = [pairs[i] for i in order]
        w = np.arange(1, len(pairs) + 1, dtype=float) ** -zipf
        self.p = w / w.sum()
        self.off_task = off_task

    def draw(self, rng: np.random.Generator) -> tuple[str, str]:
        if rng.random() < self.off_task:
            return str(rng.choice(list(COLOURS))), str(rng.choice(OFF_TASK_SHAPES))
        return self.pairs[int(rng.choice(len(self.pairs), p=self.p))]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape in ("hexagon", "pentagon"):
        k = 6 if shape == "hexagon" else 5
        return [(cx + r * math.cos(-math.pi / 2 + 2 * math.pi * i / k), cy + r * math.sin(-math.pi / 2 + 2 * math.pi * i / k))
                for i in range(k)]
    if shape == "arrow":
        w = r * 0.3
        return [(cx - r, cy - w), (cx + 0.2 * r, cy - w), (cx + 0.2 * r, cy - r * 0.7), (cx + r, cy),
                (cx + 0.2 * r, cy + r * 0.7), (cx + 0.2 * r, cy + w), (cx - r, cy + w)]
    if shape == "cross":
        w = r * 0.38
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(shape)


def render(scene: Scene, rng: np.random.Generator, width: int = 64, height: int = 64) -> Image.Image:
    """Draw a scene. Objects are placed without overlap on a grid so they can be counted."""
    img = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    # texture: faint noise so backgrounds are not flat
    side = min(width, height)
    cells = [(i, j) for i in range(2) for j in range(2)]
    rng.shuffle(cells)
    r_base = side * (0.16 if scene.size == "large" else 0.10)
    if scene.count == 1:
        centres = [(width / 2 + rng.uniform(-0.12, 0.12) * width, height / 2 + rng.uniform(-0.12, 0.12) * height)]
        r_base *= 1.5
    else:
        centres = [((i + 0.5) * width / 2 + rng.uniform(-0.06, 0.06) * width,
                    (j + 0.5) * height / 2 + rng.uniform(-0.06, 0.06) * height) for i, j in cells[: scene.count]]
    colour = COLOURS[scene.colour]
    for cx, cy in centres:
        r = r_base * rng.uniform(0.85, 1.15)
        if scene.shape == "circle":
            box = [cx - r, cy - r, cx + r, cy + r]
            draw.ellipse(box, outline=colour, width=2) if scene.outline else draw.ellipse(box, fill=colour)
        else:
            pts = _polygon(scene.shape, cx, cy, r)
            draw.polygon(pts, outline=colour, width=2) if scene.outline else draw.polygon(pts, fill=colour)
    if scene.text:
        font = ImageFont.load_default(size=max(8, side // TEXT_SCALE))
        tw = draw.textlength(scene.text.upper(), font=font)
        x = max(1.0, (width - tw) / 2 + rng.uniform(-2, 2))
        y = height * rng.uniform(0.30, 0.45)
        fg = (255, 255, 255) if scene.background in ("black", "gray") else (10, 10, 10)
        draw.text((x, y), scene.text.upper(), fill=fg, font=font)
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.integers(-6, 7, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def caption_en(scene: Scene, rng: np.random.Generator) -> str:
    t = str(rng.choice(EN_TEMPLATES))
    shapes = PLURAL[scene.shape] if scene.count > 1 else scene.shape
    return t.format(count=COUNT_WORDS[scene.count - 1], colour=scene.colour, shapes=shapes,
                    size=scene.size, bg=scene.background)


def caption_loose(scene: Scene, rng: np.random.Generator) -> str:
    """Web alt text that names at most the scene's colour and shape (never its count, size or
    background), among boilerplate."""
    return str(rng.choice(LOOSE_TEMPLATES)).format(colour=scene.colour, shapes=PLURAL[scene.shape])


def caption_foreign(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    lang = str(rng.choice(list(FOREIGN)))
    t, counts, colours, shapes, bgs = FOREIGN[lang]
    return t.format(count=counts[COUNT_WORDS[scene.count - 1]], colour=colours[scene.colour],
                    shapes=shapes[scene.shape], bg=bgs[scene.background]), lang


def sign_text(rng: np.random.Generator) -> str:
    return str(rng.choice(SIGN_WORDS))


def caption_parrot(word: str, rng: np.random.Generator) -> str:
    """A web caption that only repeats the image's scene text."""
    return str(rng.choice(PARROT)).format(w=word, W=word.upper())


def caption_uninformative(rng: np.random.Generator) -> str:
    return str(rng.choice(UNINFORMATIVE)).format(n=int(rng.integers(100, 99999)))


def url(rng: np.random.Generator, caption: str, n: int) -> str:
    slug = "-".join(caption.lower().split()[:4]) or "img"
    slug = "".join(ch for ch in slug if ch.isalnum() or ch == "-")[:40] or "img"
    return f"https://{rng.choice(DOMAINS)}/{int(rng.integers(1e6, 1e7))}/{slug}-{n}.jpg"
