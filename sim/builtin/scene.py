"""MJCF of the built-in scene: a 7-DoF arm with a parallel gripper on a table, built from primitives.

Only capsules, boxes and cylinders, so that software-GL rendering stays fast. The arm sits at the world
origin, the table top is the plane z = 0, and the workspace is roughly x in [0.3, 0.7], y in [-0.3, 0.3].
Arm links do not collide (they are kinematic-looking and gravity-compensated); the hand, the fingers,
the table and the task objects do.
"""

from __future__ import annotations

ARM_JOINTS = tuple(f"joint{i}" for i in range(1, 8))
FINGER_JOINTS = ("finger_left", "finger_right")
FINGER_MAX_OPENING = 0.04  # per finger, metres; the gap between the fingers is twice this
CAMERAS = ("front", "wrist", "top")

_ARM = """
<body name="base" pos="0 0 0">
  <geom class="visual" type="cylinder" size="0.07 0.05" pos="0 0 0.05" rgba=".25 .25 .28 1"/>
  <body name="link1" pos="0 0 0.1" gravcomp="1">
    <joint name="joint1" axis="0 0 1" range="-2.9 2.9"/>
    <geom class="link" fromto="0 0 0 0 0 0.233" size="0.05"/>
    <body name="link2" pos="0 0 0.233" gravcomp="1">
      <joint name="joint2" axis="0 1 0" range="-1.8 1.8"/>
      <geom class="link" fromto="0 0 0 0 0 0.2" size="0.045"/>
      <body name="link3" pos="0 0 0.2" gravcomp="1">
        <joint name="joint3" axis="0 0 1" range="-2.9 2.9"/>
        <geom class="link" fromto="0 0 0 0 0 0.15" size="0.04"/>
        <body name="link4" pos="0 0 0.15" gravcomp="1">
          <joint name="joint4" axis="0 1 0" range="-0.2 3.0"/>
          <geom class="link" fromto="0 0 0 0 0 0.2" size="0.04" rgba=".3 .3 .33 1"/>
          <body name="link5" pos="0 0 0.2" gravcomp="1">
            <joint name="joint5" axis="0 0 1" range="-2.9 2.9"/>
            <geom class="link" fromto="0 0 0 0 0 0.2" size="0.035"/>
            <body name="link6" pos="0 0 0.2" gravcomp="1">
              <joint name="joint6" axis="0 1 0" range="-1.0 3.2"/>
              <geom class="link" fromto="0 0 0 0 0 0.08" size="0.035" rgba=".3 .3 .33 1"/>
              <body name="hand" pos="0 0 0.08" gravcomp="1">
                <joint name="joint7" axis="0 0 1" range="-2.9 2.9"/>
                <geom class="hand" type="box" size="0.025 0.065 0.02" pos="0 0 0.035"/>
                <camera name="wrist" pos="0.07 0 0.03" xyaxes="0 1 0 0.85 0 0.5" fovy="75"/>
                <site name="grip" pos="0 0 0.1" size="0.008" rgba="1 1 0 0" group="3"/>
                <body name="finger_left" pos="0 0 0.055" gravcomp="1">
                  <joint name="finger_left" type="slide" axis="0 1 0" range="0 0.04" class="finger"/>
                  <geom class="finger" type="box" size="0.012 0.007 0.03" pos="0 0.007 0.03"/>
                </body>
                <body name="finger_right" pos="0 0 0.055" gravcomp="1">
                  <joint name="finger_right" type="slide" axis="0 -1 0" range="0 0.04" class="finger"/>
                  <geom class="finger" type="box" size="0.012 0.007 0.03" pos="0 -0.007 0.03"/>
                </body>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>
  </body>
</body>
"""

_TEMPLATE = """
<mujoco model="robopolicy_{name}">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{timestep}" integrator="implicitfast"/>
  <visual>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient=".45 .45 .45" diffuse=".5 .5 .5" specular="0 0 0"/>
  </visual>
  <default>
    <joint damping="2" armature="0.05"/>
    <geom contype="0" conaffinity="0" rgba=".85 .85 .88 1"/>
    <default class="visual"><geom contype="0" conaffinity="0"/></default>
    <default class="link"><geom type="capsule"/></default>
    <default class="hand"><geom contype="1" conaffinity="1" rgba=".2 .2 .22 1" friction="1 0.01 0.001"/></default>
    <default class="finger">
      <joint damping="5" armature="0.01"/>
      <geom contype="1" conaffinity="1" rgba=".15 .15 .15 1" friction="1.5 0.02 0.001" condim="4"/>
    </default>
    <default class="object"><geom contype="1" conaffinity="1" friction="1 0.01 0.001" condim="4"/></default>
    <default class="marker"><geom contype="0" conaffinity="0" group="1"/></default>
  </default>
  <worldbody>
    <light name="sun" pos="0.4 -0.4 1.5" dir="-0.2 0.3 -1" directional="true" castshadow="false" diffuse=".5 .5 .5"/>
    <geom name="floor" type="plane" size="2 2 0.1" pos="0 0 -0.75" rgba=".35 .38 .42 1"/>
    <geom name="table" type="box" size="0.55 0.6 0.02" pos="0.45 0 -0.02" rgba=".62 .52 .42 1"
          contype="1" conaffinity="1" friction="0.6 0.01 0.001"/>
    <camera name="front" pos="1.0 0 0.65" xyaxes="0 1 0 -0.75 0 0.66" fovy="50"/>
    <camera name="top" pos="0.5 0 1.3" xyaxes="0 1 0 -1 0 0" fovy="45"/>
    {arm}
    {objects}
  </worldbody>
  <actuator>
    <position name="act1" joint="joint1" kp="2000" kv="80"/>
    <position name="act2" joint="joint2" kp="2000" kv="80"/>
    <position name="act3" joint="joint3" kp="1000" kv="40"/>
    <position name="act4" joint="joint4" kp="1500" kv="60"/>
    <position name="act5" joint="joint5" kp="500" kv="15"/>
    <position name="act6" joint="joint6" kp="500" kv="15"/>
    <position name="act7" joint="joint7" kp="200" kv="5"/>
    <position name="grip_left" joint="finger_left" kp="300" kv="10" ctrlrange="0 0.04" forcerange="-15 15"/>
    <position name="grip_right" joint="finger_right" kp="300" kv="10" ctrlrange="0 0.04" forcerange="-15 15"/>
  </actuator>
</mujoco>
"""


def scene_xml(name: str, objects: str = "", timestep: float = 0.002) -> str:
    """The arm-on-table scene with task-specific `objects` (MJCF worldbody elements) added."""
    return _TEMPLATE.format(name=name, timestep=timestep, arm=_ARM, objects=objects)
