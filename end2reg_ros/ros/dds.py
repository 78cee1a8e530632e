"""The Fast DDS profile for large images (``config/fastdds_shm.xml``) and where it applies.

Fast DDS reads a default XML profile from ``FASTDDS_DEFAULT_PROFILES_FILE`` (Fast DDS 3:
Kilted and later, and the PyPI wheels here) or ``FASTRTPS_DEFAULT_PROFILES_FILE`` (Fast DDS
2: Humble, Iron, Jazzy; Kilted still reads it but warns that it is deprecated). ``end2reg
demo`` and the launch files set the one the distro (``ROS_DISTRO``) reads, for the processes
they start, unless the user has set either (then the user's choice stands). See the comment
in the XML file for why and what.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PROFILE_FILE = "fastdds_shm.xml"
PROFILE_ENV_VARS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")


def profile_path() -> Path | None:
    """The profile in this source tree (``config/``) or in the installed package's share
    directory; None when neither is found."""
    here = Path(__file__).resolve().parents[2] / "config" / PROFILE_FILE
    if here.is_file():
        return here
    try:
        from ament_index_python.packages import get_package_share_directory

        shared = Path(get_package_share_directory("end2reg_ros")) / "config" / PROFILE_FILE
    except Exception:  # noqa: BLE001 - no ament index (PyPI-only) or package not installed
        return None
    return shared if shared.is_file() else None


#: Distros whose Fast DDS (2.x) reads only FASTRTPS_DEFAULT_PROFILES_FILE.
FASTDDS2_DISTROS = ("foxy", "galactic", "humble", "iron", "jazzy")


def profile_env_var(environ: Mapping[str, str]) -> str:
    """The variable this distro's Fast DDS reads (no ``ROS_DISTRO``: the PyPI Kilted set-up)."""
    distro = environ.get("ROS_DISTRO", "").strip().lower()
    return PROFILE_ENV_VARS[1] if distro in FASTDDS2_DISTROS else PROFILE_ENV_VARS[0]


def profile_env_updates(environ: Mapping[str, str], profile: str | os.PathLike | None
                        ) -> dict[str, str]:
    """The variable to set so that Fast DDS loads ``profile``, or nothing when ``profile``
    is empty/None or the environment already names a profile file (either name)."""
    if not profile or any(name in environ for name in PROFILE_ENV_VARS):
        return {}
    return {profile_env_var(environ): str(profile)}


def with_profile(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` plus the profile variables (see :func:`profile_env_updates`)."""
    return {**environ, **profile_env_updates(environ, profile_path())}
