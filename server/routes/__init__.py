"""HTTP routes: one module per endpoint family, each exporting an APIRouter named ``router``."""
