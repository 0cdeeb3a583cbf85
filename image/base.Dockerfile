# kproxy's base image: the Debian 12 root filesystem that image/build.py makes
# with mmdebstrap (image/debian.in), as one layer. The build context is the
# directory holding that rootfs.tar; image/build.py tags the result
# localhost/kproxy-base:<hash of its inputs>.
FROM scratch
ADD rootfs.tar /
