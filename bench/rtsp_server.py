"""A real RTSP server: gst-rtsp-server serving one H.264 clip at /cam, like a camera.

Runs under Debian's python3 (python3-gi + gir1.2-gst-rtsp-server-1.0), not the venv; start it
with bench.rtsp.RtspServer.
usage: rtsp_server.py PORT CLIP [USER:PASSWORD] [--loop-fps FPS]
An mp4 clip plays once. With --loop-fps, CLIP is raw H.264 (Annex B, no B-frames) that plays
forever at FPS, its timestamps running on across each restart of the file. Prints "ready" on
stdout once it listens. The clip plays in real time; a shared media means every client sees
the same live stream.
"""

import argparse

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port")
    parser.add_argument("clip")
    parser.add_argument("credentials", nargs="?")
    parser.add_argument("--loop-fps", type=int)
    args = parser.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(args.port)
    factory = GstRtspServer.RTSPMediaFactory()
    if args.loop_fps:
        # h264parse numbers the frames (DTS) on across the file's restarts; without B-frames
        # the presentation time is the same, and the payloader needs it.
        factory.set_launch(
            f'( multifilesrc location="{args.clip}" loop=true caps="video/x-h264,stream-format=byte-stream,'
            f'framerate={args.loop_fps}/1" ! h264parse name=parse ! rtph264pay name=pay0 pt=96 config-interval=1 )'
        )
        factory.connect("media-configure", _stamp_presentation_times)
    else:
        factory.set_launch(
            f'( filesrc location="{args.clip}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )'
        )
    factory.set_shared(True)
    if args.credentials:
        user, password = args.credentials.split(":", 1)
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_permission_for_role("user", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
        permissions.add_permission_for_role("user", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        raise SystemExit(f"cannot listen on port {args.port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


def _stamp_presentation_times(factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
    def stamp(pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        buffer = info.get_buffer()
        buffer.pts = buffer.dts
        return Gst.PadProbeReturn.OK

    media.get_element().get_by_name("parse").get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, stamp)


if __name__ == "__main__":
    main()
