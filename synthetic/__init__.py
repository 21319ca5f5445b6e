"""The built-in synthetic visual-place-recognition data set (the library; ``synthetic_dataset.py``
is its command).

Writes a deterministic data set in the Visual Geo-localization Benchmark layout::

    <datasets_folder>/<dataset_name>/images/{train,val,test}/{database,queries}/*.jpg
    <datasets_folder>/<dataset_name>/synthetic_dataset.json      (parameters, counts, look-alikes)

How the world is built (everything from numpy + Pillow, keyed by the seed):

* every split lies in its own area (its own UTM offset and its own place seeds) and holds a few
  routes: polylines whose direction stays within 45 degrees of a main direction, so points far apart
  along a route are far apart on the map too, and routes of one split lie side by side with 200 m gaps;
* a route is a street seen sideways: a strip of procedural facades (the "places": buildings with
  window grids, shop fronts, awnings, signs, textures, roofs), a hazy skyline behind them and poles,
  lamps, signs and trees in front of them. The three layers move with parallax as the camera moves;
* database images are taken every ``db_spacing_m`` metres along the routes (day, centred, mild
  noise, occasionally a car or a pedestrian); queries are other visits at random positions: other
  light (brightness, contrast, colour cast, gamma, night images with lit windows and lamp glow),
  other viewpoint (lateral offset = zoom, pan, tilt, roll, oblique "forward" views), occluders
  (cars, pedestrians, blobs), noise and blur. The note field says ``day``/``night`` and
  ``sideways`` (frontal like the database) or ``forward`` (oblique), as MSLS mining expects;
* look-alikes (hard negatives): a few runs of three buildings are copied, with small changes of
  colour, height, signs and lit windows, to places at least 150 m away;
* labels carry a little GPS noise. Every query lies within 10 m of a database image (so within
  the 25 m evaluation radius too); the generator checks this and fails loudly otherwise.

The same seed and options give byte-identical files (Pillow's JPEG encoder at a fixed quality is
deterministic). Generation is atomic: the set is written into a hidden temporary folder next to
the target and renamed into place, so an interrupted run never leaves a half data set behind.

The modules, each importing only those above it in this list:

* ``geometry``: UTM to lat/lon, image names and ids, route polylines, distances (metres);
* ``camera``: the camera's viewpoint ranges and the pixel canvas they need;
* ``plan``: per split, the routes and every shot's position and label (no pixels);
* ``buildings``: the facades along every route and the look-alike copies (no pixels);
* ``scene``: a route's skyline, facade and street-furniture strips, drawn once;
* ``views``: one shot's image: composition, viewpoint, occluders, light and noise;
* ``options``: presets and option checks (the manifest's ``params``);
* ``writer``: generation of the splits, the manifest, atomic publishing, reuse.
"""

from .options import GENERATOR_VERSION, PRESETS, OptionError, SyntheticOptions, resolve_options
from .plan import SPLITS
from .writer import MANIFEST_NAME, ensure_dataset, generate, read_manifest

__all__ = [
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "PRESETS",
    "SPLITS",
    "OptionError",
    "SyntheticOptions",
    "ensure_dataset",
    "generate",
    "read_manifest",
    "resolve_options",
]
