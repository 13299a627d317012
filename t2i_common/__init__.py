"""What both daemons share: the public API's request schema, its error vocabulary and config loading.

Nothing here imports torch or diffusers, so the gateway can use it without the orchestrator extra.
"""

import re

__version__ = "0.1.0"

# The built-in demo model (t2i_orchestrator.demo_model builds it): named here so that the gateway's
# playground can say what it is without importing the orchestrator.
DEMO_MODEL_ID = "t2i/tiny-sd"

# The formats an image may be asked for (``output_format``, as OpenAI names it): each one's media type.
IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FORMAT_PATTERN = "|".join(IMAGE_FORMATS)

# Where a node serves an image: /stream/<id>/<name>.<format>, both random hex (its storage names them).
# The gateway fetches nothing else from a node.
IMAGE_ID_PATTERN = "[0-9a-f]{32}"
IMAGE_NAME_PATTERN = "[0-9a-f]{16}"
IMAGE_PATH = re.compile(f"/stream/({IMAGE_ID_PATTERN})/({IMAGE_NAME_PATTERN})\\.({FORMAT_PATTERN})")
