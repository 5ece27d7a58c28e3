"""fastdit.diffusion, fastdit.latents and fastdit.text import without diffusers and transformers (the GPU
machine may lack them); only building a VAE or a caption encoder needs them."""
import subprocess
import sys

CODE = """
import sys
sys.modules["diffusers"] = None      # makes `import diffusers` raise ImportError
sys.modules["transformers"] = None
import fastdit.diffusion, fastdit.latents, fastdit.text
from fastdit.latents import ConvAutoencoder
ConvAutoencoder()
try:
    fastdit.latents.AutoencoderKLLatents.from_pretrained("nowhere")
except ImportError as err:
    assert "diffusers" in str(err)
else:
    raise SystemExit("no ImportError")
print("ok")
"""


def test_imports_without_diffusers_and_transformers():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
