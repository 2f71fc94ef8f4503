import sys
from pathlib import Path

# worlds.py is imported by forkserver children by module name
sys.path.insert(0, str(Path(__file__).parent))
