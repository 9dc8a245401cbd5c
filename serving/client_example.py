"""The README's Python client: POST four digits images as JSON, print each image's answer (the test runs it)."""

import json
import os
import urllib.request

from backbone.data import load_dataset

url = os.environ.get("ADAPERCEIVER_URL", "http://127.0.0.1:8000")
images = load_dataset("digits").splits["test"].x[:4]  # (4, 1, 8, 8) floats in [0, 1]
body = json.dumps({"images": images.tolist(), "tolerance": 5.0}).encode()
request = urllib.request.Request(f"{url}/", body, {"Content-Type": "application/json"})
for p in json.load(urllib.request.urlopen(request))["predictions"]:
    print(p["class"], f"{p['confidence']:.3f}", p["configuration"], f"{p['mflops']:.2f} MFLOPs",
          f"bound {100 * p['operating_point']['bound']:.2f}% at tolerance {p['operating_point']['tolerance']}%")
