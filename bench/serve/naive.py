"""The baseline of bench/serve: a model endpoint written the obvious way with FastAPI (a pydantic request
model, a plain ``def`` route that FastAPI runs in its thread pool, one forward per request).

    python bench/serve/naive.py BUNDLE PORT [THREADS]
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

import choline


class Digits(BaseModel):
    pixels: list[float]


class Image(BaseModel):
    image: list[list[list[int]]]


def make_app(path: str) -> FastAPI:
    bundle = choline.load_bundle(path)
    labels = bundle.labels or []
    app = FastAPI()

    def answer(logits: torch.Tensor) -> dict[str, object]:
        i = int(logits.argmax())
        return {"label": labels[i], "logits": logits.tolist()}

    if bundle.inputs[0]["name"] == "pixels":

        @app.post("/predict")
        def predict_digits(req: Digits) -> dict[str, object]:
            with torch.no_grad():
                return answer(bundle.predict(torch.tensor([req.pixels]))[0])

    else:

        @app.post("/predict")
        def predict_image(req: Image) -> dict[str, object]:
            with torch.no_grad():
                return answer(bundle.predict(torch.tensor([req.image], dtype=torch.uint8))[0])

    return app


if __name__ == "__main__":
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    uvicorn.run(make_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
