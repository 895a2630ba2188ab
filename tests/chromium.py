"""Headless Chromium (Debian's ``chromium``) for the status page test and its screenshot script,
and a PNG reader small enough not to need Pillow."""

from __future__ import annotations

import struct
import subprocess
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

#: Keep the browser on this machine: no name resolves (127.0.0.1 is an address, not a name),
#: and the background services that call home are off.
_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
    "--disable-client-side-phishing-detection", "--metrics-recording-only",
    "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--hide-scrollbars", "--force-device-scale-factor=1",
]


def chromium(binary: str, profile: Path, url: str, *args: str, timeout: float = 30) -> bytes:
    """Run one headless Chromium with its own profile directory; its stdout."""
    result = subprocess.run([binary, *_FLAGS, f"--user-data-dir={profile}", *args, url],
                            capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"chromium exited {result.returncode}:\n"
                             f"{result.stderr.decode(errors='replace')[-3000:]}")
    return result.stdout


def dump_dom(binary: str, profile: Path, url: str, budget_ms: int = 3000) -> str:
    """The DOM after the page's scripts ran for ``budget_ms`` of virtual time."""
    dom = chromium(binary, profile, url, f"--virtual-time-budget={budget_ms}",
                   "--dump-dom").decode()
    if not dom.strip():  # a failed page load still exits 0
        raise AssertionError(f"chromium rendered nothing for {url}")
    return dom


def screenshot(binary: str, profile: Path, url: str, *, out: Path, size: tuple[int, int],
               budget_ms: int = 3000) -> bytes:
    """A PNG of the page at ``size`` (width, height) after its scripts ran."""
    out.unlink(missing_ok=True)
    chromium(binary, profile, url, f"--virtual-time-budget={budget_ms}",
             f"--window-size={size[0]},{size[1]}", f"--screenshot={out}")
    return out.read_bytes()


_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "source", "track", "wbr", "line", "polyline", "path", "rect", "circle"})


class ElementText(HTMLParser):
    """Text content of the elements with an id, and the attributes of every element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: dict[str, str] = {}
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag in _VOID:
            return
        ident = attributes.get("id")
        if ident is not None:
            self.text.setdefault(ident, "")
        self._open.append((tag, ident))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index][0] == tag:
                del self._open[index:]
                return

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident is not None:
                self.text[ident] += data


def parse_dom(dom: str) -> ElementText:
    parser = ElementText()
    parser.feed(dom)
    parser.close()
    return parser


@dataclass(frozen=True)
class Png:
    width: int
    height: int
    channels: int
    rows: list[bytes]  # unfiltered scanlines, 8 bits per sample

    def pixel(self, x: int, y: int) -> tuple[int, ...]:
        start = x * self.channels
        return tuple(self.rows[y][start:start + self.channels])


def read_png(data: bytes) -> Png:
    """Decode an 8-bit, non-interlaced grey/RGB/RGBA PNG (what Chromium writes)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, bytearray(), b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + chunk) != crc:
            raise ValueError(f"bad CRC in {kind!r}")
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {color}, interlace {interlace}")
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise ValueError(f"IDAT holds {len(raw)} bytes, expected {height * (stride + 1)}")
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        _unfilter(kind, line, previous, channels)
        rows.append(bytes(line))
        previous = line
    return Png(width, height, channels, rows)


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> None:
    if kind == 0:
        return
    n = len(line)
    if kind == 1:  # Sub
        for i in range(bpp, n):
            line[i] = (line[i] + line[i - bpp]) & 0xFF
    elif kind == 2:  # Up
        for i in range(n):
            line[i] = (line[i] + prev[i]) & 0xFF
    elif kind == 3:  # Average
        for i in range(n):
            left = line[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
    elif kind == 4:  # Paeth
        for i in range(n):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predictor = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            line[i] = (line[i] + predictor) & 0xFF
    else:
        raise ValueError(f"bad PNG filter type {kind}")


def luminance_stats(png: Png, step: int = 2) -> tuple[float, int]:
    """(variance of the grey level, number of distinct colours) over every ``step``-th pixel."""
    values: list[float] = []
    colours: set[tuple[int, ...]] = set()
    for y in range(0, png.height, step):
        for x in range(0, png.width, step):
            px = png.pixel(x, y)
            colours.add(px[:3])
            values.append(px[0] if png.channels < 3 else
                          0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2])
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values), len(colours)
