"""end2reg_ros: markerless spine registration (End2Reg) for ROS 2.

Everything in this package imports without rclpy except the ``end2reg_ros.ros``
subpackage, the only layer that talks to ROS.

Conventions used throughout (see README "Units and frames"):

* Internal geometry is in **millimetres**. ROS messages (tf2, PointCloud2) are in
  **metres**; conversion happens only in ``end2reg_ros.ros``.
* A pose named ``a_from_b`` is a 4x4 homogeneous matrix that maps points expressed
  in frame ``b`` into frame ``a``: ``p_a = a_from_b @ p_b``.
* ``cam`` is the camera's optical frame (REP 103/105: x right, y down, z forward).
* ``spine`` is the preoperative (CT) frame of the lumbar spine model.
"""

__version__ = "0.1.0"

# The generated message interfaces (end2reg_ros.msg) may live in another folder named
# end2reg_ros on sys.path (the venv's site-packages in development mode): make them part
# of this package. In a colcon install both are one folder and this is a no-op.
from pkgutil import extend_path as _extend_path

__path__ = _extend_path(__path__, __name__)
