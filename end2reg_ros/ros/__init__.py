"""The ROS 2 layer: the only subpackage of end2reg_ros that imports rclpy."""
