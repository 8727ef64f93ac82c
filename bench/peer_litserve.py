"""LitServe's API for ``bench/peers.py`` (imported only by the peers' interpreter).

LitServe starts its inference worker with multiprocessing's ``spawn``, which pickles the API by
reference, so the class must live at a module's top level; this module imports litserve at import
time and so is never imported by the project's own code.

LitServe's request handler parses every body with ``request.json()``, so this peer receives the
OIP JSON body (``inputs[0].data``) and answers OIP JSON.
"""

from __future__ import annotations

from typing import Any

import litserve as ls  # type: ignore[import-not-found]
import numpy as np

PATH = "/v2/models/mlp/infer"


class MlpApi(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        from bench.serve import _model

        self.model = _model()

    # Unannotated on purpose: LitServe picks the body's parsing from this annotation, and with
    # none it passes the body parsed as JSON.
    def decode_request(self, request) -> np.ndarray:  # type: ignore[no-untyped-def]
        tensor = request["inputs"][0]
        return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out: np.ndarray = self.model(torch.from_numpy(x)).numpy()
        return out

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        # One row per request, as the load generator sends.
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, logits: np.ndarray) -> dict[str, Any]:
        return {
            "model_name": "mlp",
            "outputs": [
                {"name": "logits", "shape": list(logits.shape), "datatype": "FP32", "data": logits.ravel().tolist()},
                {"name": "class", "shape": [len(logits)], "datatype": "INT64", "data": logits.argmax(-1).tolist()},
            ],
        }


def run(port: int, max_batch: int, wait_s: float) -> None:
    api = MlpApi(max_batch_size=max_batch, batch_timeout=wait_s, api_path=PATH)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")
