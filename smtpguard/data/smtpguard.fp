;
; smtpguard.fp -- smtpguard's own SYN signatures, in p0f v3 syntax
; ------------------------------------------------------------------
;
; Format: p0f README section 5. Only [tcp:request] is read by smtpguard:
;
;   label = type:class:name:flavor     type s = specific, g = generic (last resort)
;   sig   = ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass
;
; These entries were written for smtpguard from what is published about each
; stack (its initial TTL, how it sizes the SYN window, its window-scale shift,
; the order in which it writes TCP options, its IP ID and DF habits), not
; copied from p0f.fp. Each group says where its numbers come from. The label
; name decides the family a rule sees (core/fingerprint.py FAMILY_BY_NAME):
; Windows -> windows, Linux -> linux, Android -> android, macOS -> macos,
; iOS -> ios, FreeBSD -> freebsd, OpenBSD -> openbsd, anything else -> other.
;
; Conventions used below:
;  - ver '*': one line serves IPv4 and IPv6. Quirks of the other IP version
;    are ignored, so 'df,id+,flow' means "DF and a non-zero IP ID" on IPv4
;    and "a non-zero flow label" on IPv6.
;  - df,id+: DF set for path MTU discovery (RFC 1191) with a non-zero IP ID;
;    every modern stack here does that, except FreeBSD 13+ (see there).
;  - flow: the stack labels IPv6 flows by default (RFC 6437). The matcher
;    treats a differing flow label as fuzzy, never as a mismatch.
;  - mss '*': the MSS follows the link (1460 on Ethernet, 1452 on PPPoE,
;    1440 on IPv6, ...); only loopback values are written literally.
;  - 'mss*N' windows also match when a router clamped the MSS option, because
;    the matcher retries the multiple with the plain-Ethernet MSS.
;

classes = win,unix,other

[tcp:request]

; ======================================================================
; Windows: initial TTL 128 on every NT version. Since Vista the SYN options
; are MSS, NOP, window scale, NOP, NOP, SACK-permitted, and no timestamps
; unless the admin enables RFC 1323 timestamps (netsh ... timestamps=enabled,
; which yields MSS, NOP, WS, SACK-permitted, TS).
; ======================================================================

; NT 5.x (2000, XP, Server 2003): no window scaling and no timestamps by
; default (registry Tcp1323Opts=0), so the options are MSS, NOP, NOP, SACK.
; Window: 16 KB rounded up to whole segments, i.e. 17520 = 12 x 1460 on
; Ethernet (Microsoft's Windows 2000/2003 TCP/IP implementation paper),
; 64 KB rounded down on fast links (64240 = 44 x 1460), or a registry
; TcpWindowSize of 65535 or 16384.
label = s:win:Windows:XP, 2000 or Server 2003
sig   = *:128:0:*:mss*12,0:mss,nop,nop,sok:df,id+:0
sig   = *:128:0:*:mss*44,0:mss,nop,nop,sok:df,id+:0
sig   = *:128:0:*:65535,0:mss,nop,nop,sok:df,id+:0
sig   = *:128:0:*:16384,0:mss,nop,nop,sok:df,id+:0

; NT 6.0/6.1 clients (Vista, 7): receive-window auto-tuning announces a fixed
; 8192-byte SYN window with a shift of 2 (Wireshark shows "Win=8192 WS=4").
label = s:win:Windows:7 or Vista
sig   = *:128:0:*:8192,2:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = *:128:0:*:8192,2:mss,nop,ws,sok,ts:df,id+:0

; NT 6.1 server and NT 6.2/6.3 (Server 2008 R2, 8, 8.1, Server 2012): the
; same 8192 window with a shift of 8 ("Win=8192 WS=256").
label = s:win:Windows:8, 8.1 or Server 2008 R2-2012
sig   = *:128:0:*:8192,8:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = *:128:0:*:8192,8:mss,nop,ws,sok,ts:df,id+:0

; NT 10 (Windows 10, 11, Server 2016 and later): the SYN window is 64 KB
; rounded down to whole segments, 64240 = 44 x 1460 on Ethernet ("Win=64240
; WS=256"), 45 x 1440 on IPv6; 65535 with the loopback MSS of 65495.
label = s:win:Windows:10/11 or Server 2016+
sig   = *:128:0:*:mss*44,8:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = *:128:0:*:mss*45,8:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = *:128:0:*:mss*46,8:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = *:128:0:*:mss*47,8:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = *:128:0:*:mss*48,8:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = *:128:0:*:65535,8:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = *:128:0:*:mss*44,8:mss,nop,ws,sok,ts:df,id+:0

; Last resort: TTL 128 and a Windows option layout, any window or shift.
label = g:win:Windows:NT 6 or newer
sig   = *:128:0:*:*,*:mss,nop,ws,nop,nop,sok:df,id+:0
label = g:win:Windows:NT 5
sig   = *:128:0:*:*,0:mss,nop,nop,sok:df,id+:0

; ======================================================================
; Android: the Linux stack with Android's own buffer settings. These lines
; come before Linux's, whose 4.19+ lines accept any shift. Android
; kernels before 4.19 carried a tcp_default_init_rwnd patch that let the
; SYN window reach 64 KB (44 x 1460) while mainline Linux announced 10 or 20
; segments, and Android's per-network tcp_rmem maxima (110208 bytes on
; UMTS, about 1-2.5 MB on HSPA/Wi-Fi/LTE) give shifts of 1 to 6, below
; mainline's 7. An Android whose window is in whole segments sends the same
; SYN as desktop Linux and is reported as linux: a SYN cannot tell them
; apart. Most Android 10+ phones announce 65535 instead (see below).
; ======================================================================

label = s:unix:Android:4.x-9
sig   = *:64:0:*:mss*44,1:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*44,2:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*44,3:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*44,4:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*44,5:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*44,6:mss,sok,ts,nop,ws:df,id+,flow:0
; Android 1.5 (Linux 2.6.27) wrote the MSS after SACK-permitted and TS (P0F2X).
sig   = *:64:0:*:mss*4,1:sok,ts,mss,nop,ws:df,id+,flow:0
; The same patch without rounding to whole segments announced 65535.
sig   = *:64:0:*:65535,1:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,2:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,3:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,4:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,5:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,6:mss,sok,ts,nop,ws:df,id+,flow:0

; Android 10 and newer: the same 65535 window (Android's own tcp_rmem and
; init_rwnd settings, not mainline's whole-segment rounding) with the larger
; shifts of today's buffers, 7 to 12. Source: the Trustable p0f data (real
; traffic labelled by User-Agent, in biandratti/huginn-net's p0f.fp, LGPL):
; about a hundred Android SYNs, almost all 65535 with shift 8, 9 or 10,
; while its desktop Linux SYNs are 44 segments (mss*44). Desktop Linux
; announces 65535 only when 44 segments exceed it (MSS above 1489: jumbo
; frames, loopback), which a mail server on the Internet rarely sees.
label = s:unix:Android:10 or newer
sig   = *:64:0:*:65535,7:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,8:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,9:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,10:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,11:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:65535,12:mss,sok,ts,nop,ws:df,id+,flow:0

; ======================================================================
; Linux: initial TTL 64 (net.ipv4.ip_default_ttl). Options MSS, SACK-
; permitted, TS, NOP, WS (net/ipv4/tcp_output.c writes them in that order
; so that SACK-permitted shares a word with TS); with net.ipv4.tcp_timestamps=0
; the order is MSS, NOP, NOP, SACK-permitted, NOP, WS. The window is a whole
; number of segments; how many changed over the years:
;   2.6.x               4 segments (5840 = 4 x 1460)
;   2.6.39 - 3.x        10 segments (TCP_DEFAULT_INIT_RCVWND = 10)
;   3.x - 4.18          20 segments (29200 = 20 x 1460, e.g. RHEL 7, Ubuntu 16.04)
;   4.19 and newer      64 KB rounded down (64240 = 44 x 1460), after the
;                       4.19 change "tcp: up initial rmem to 128KB and SYN
;                       rwin to around 64KB"
; The shift follows the largest receive buffer (tcp_rmem[2], rmem_max):
; 7 for the 6 MB default, 9 for 16 MB and 10 for 32 MB, both common tunings.
; ======================================================================

label = s:unix:Linux:4.19-6.x
; 64 KB rounded down to whole segments: 44 x 1460 on Ethernet, 45 x 1440 on
; IPv6, 46-48 segments for the 1365-1424 byte MSS of tunnels and VPNs.
sig   = *:64:0:*:mss*44,*:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*45,*:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*46,*:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*47,*:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*48,*:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*44,*:mss,nop,nop,sok,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*45,*:mss,nop,nop,sok,nop,ws:df,id+,flow:0

label = s:unix:Linux:3.x-4.18
sig   = *:64:0:*:mss*20,*:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*20,*:mss,nop,nop,sok,nop,ws:df,id+,flow:0

label = s:unix:Linux:2.6.39-3.x
sig   = *:64:0:*:mss*10,*:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:mss*10,*:mss,nop,nop,sok,nop,ws:df,id+,flow:0

label = s:unix:Linux:2.6.x
sig   = *:64:0:*:mss*4,*:mss,sok,ts,nop,ws:df,id+,flow:0

; Loopback (MTU 65536): MSS 65495 over IPv4 and 65476 over IPv6, and the
; 64 KB window rounds down to exactly one segment.
label = s:unix:Linux:loopback
sig   = 4:64:0:65495:65495,*:mss,sok,ts,nop,ws:df,id+:0
sig   = 6:64:0:65476:65476,*:mss,sok,ts,nop,ws:flow:0

; Maemo 5 (Nokia N900, Linux 2.6.28): timestamps without SACK (P0F2X).
label = s:unix:Linux:Maemo 5
sig   = *:64:0:*:mss*4,4:mss,nop,nop,ts,nop,ws:df,id+:0

label = g:unix:Linux:2.6 or newer
sig   = *:64:0:*:*,*:mss,sok,ts,nop,ws:df,id+,flow:0
sig   = *:64:0:*:*,*:mss,nop,nop,sok,nop,ws:df,id+,flow:0

; ======================================================================
; Apple (XNU): initial TTL 64, window 65535, options MSS, NOP, WS, NOP, NOP,
; TS, SACK-permitted, then EOL with one byte of padding (XNU's tcp_output
; appends SACK-permitted after the timestamp and pads with EOL). DF is set
; and IP IDs are random (net.inet.ip.random_id=1); IPv6 flows are labelled
; (net.inet6.ip6.auto_flowlabel=1). Since OS X 10.11 / iOS 9 Apple asks for
; ECN on part of its connections and since macOS 10.13 / iOS 11 on most, so
; each line also exists with the 'ecn' quirk (ECE and CWR set on the SYN).
; The shift tells the generations apart; macOS 11+ and iOS 14+ both use 6,
; and that SYN is reported as macos.
; ======================================================================

label = s:unix:macOS:11 or newer (or iOS 14+)
sig   = *:64:0:*:65535,6:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,flow:0
sig   = *:64:0:*:65535,6:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,ecn,flow:0
; The same with an IP ID of zero under DF (RFC 6864 §4.1 allows it for
; atomic datagrams): most of the Trustable p0f data's macOS and iOS SYNs.
sig   = *:64:0:*:65535,6:mss,nop,ws,nop,nop,ts,sok,eol+1:df,flow:0
sig   = *:64:0:*:65535,6:mss,nop,ws,nop,nop,ts,sok,eol+1:df,ecn,flow:0

label = s:unix:macOS:10.x
sig   = *:64:0:*:65535,3:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,flow:0
sig   = *:64:0:*:65535,4:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,flow:0
sig   = *:64:0:*:65535,5:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,flow:0
sig   = *:64:0:*:65535,4:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,ecn,flow:0
sig   = *:64:0:*:65535,5:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,ecn,flow:0
; IP ID zero under DF, as above (Trustable p0f data, shift 5).
sig   = *:64:0:*:65535,5:mss,nop,ws,nop,nop,ts,sok,eol+1:df,flow:0
sig   = *:64:0:*:65535,5:mss,nop,ws,nop,nop,ts,sok,eol+1:df,ecn,flow:0

; Older iPhones and iPads used the smaller shift of 2 (published p0f v3
; observations of iOS devices).
label = s:unix:iOS:iPhone or iPad
sig   = *:64:0:*:65535,2:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,flow:0
sig   = *:64:0:*:65535,2:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,ecn,flow:0

label = g:unix:macOS:or iOS
sig   = *:64:0:*:*,*:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,flow:0
sig   = *:64:0:*:*,*:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,ecn,flow:0

; ======================================================================
; FreeBSD: initial TTL 64 (net.inet.ip.ttl), window 65535, options MSS,
; NOP, WS, SACK-permitted, TS (sys/netinet/tcp_output.c). The BSD shift is
; the smallest that lets 65535 << shift reach the socket-buffer ceiling
; kern.ipc.maxsockbuf: 2 MB by default since 9.x gives 6; the 256 KB of 7.x
; and 8.x gives 3. Since 13.0, net.inet.ip.rfc6864=1 sends IP ID 0 on
; datagrams with DF set (RFC 6864 §4.1), hence 'df' without 'id+'.
; ======================================================================

label = s:unix:FreeBSD:13 or newer
sig   = *:64:0:*:65535,6:mss,nop,ws,sok,ts:df,flow:0

label = s:unix:FreeBSD:9-12
sig   = *:64:0:*:65535,6:mss,nop,ws,sok,ts:df,id+,flow:0

label = s:unix:FreeBSD:7-8
sig   = *:64:0:*:65535,3:mss,nop,ws,sok,ts:df,id+,flow:0

; FreeBSD 5.3-5.4 wrote OpenBSD's option order with its own 65535 window (P0F2X).
label = s:unix:FreeBSD:5.x
sig   = *:64:0:*:65535,1:mss,nop,nop,sok,nop,ws,nop,nop,ts:df,id+:0

; The generic FreeBSD line takes any window: net.inet.tcp.recvspace changes it
; (PC-BSD 7 announced 49152, Satori), and no other stack that starts at TTL 64
; writes MSS, NOP, WS, SACK-permitted, TS (Linux puts SACK-permitted second,
; Windows starts at 128).
label = g:unix:FreeBSD:
sig   = *:64:0:*:*,*:mss,nop,ws,sok,ts:df,id+,flow:0
sig   = *:64:0:*:*,*:mss,nop,ws,sok,ts:df,flow:0

; ======================================================================
; OpenBSD: initial TTL 64, window 16384 (tcp_recvspace), options MSS, NOP,
; NOP, SACK-permitted, NOP, WS, NOP, NOP, TS (sys/netinet/tcp_output.c);
; random IP IDs with DF. The shift follows sb_max the BSD way: 256 KB gave
; 3 (4.x, 5.x), the later 2 MB gives 6.
; ======================================================================

label = s:unix:OpenBSD:6.x or newer
sig   = *:64:0:*:16384,6:mss,nop,nop,sok,nop,ws,nop,nop,ts:df,id+:0

label = s:unix:OpenBSD:4.x-5.x
sig   = *:64:0:*:16384,3:mss,nop,nop,sok,nop,ws,nop,nop,ts:df,id+:0

; OpenBSD 3.3-3.7 also announced 32768 or 57344 (P0F2X).
label = s:unix:OpenBSD:3.x
sig   = *:64:0:*:32768,0:mss,nop,nop,sok,nop,ws,nop,nop,ts:df,id+:0
sig   = *:64:0:*:57344,0:mss,nop,nop,sok,nop,ws,nop,nop,ts:df,id+:0

; The generic OpenBSD line is its option order alone, which no other stack
; writes (FreeBSD 5.x's 65535 window has its own line above): any window, and
; without DF too, as OpenBSD 2.6-2.9 sent it (Satori).
label = g:unix:OpenBSD:
sig   = *:64:0:*:*,*:mss,nop,nop,sok,nop,ws,nop,nop,ts:df,id+:0
sig   = 4:64:0:*:*,*:mss,nop,nop,sok,nop,ws,nop,nop,ts::0

; ======================================================================
; Other systems a mail server meets: Unix servers, network gear, printers,
; consoles and embedded stacks. Each must come out "other", never Windows
; or unknown: scan-to-mail printers, UPS cards, switches and routers send
; alerts by SMTP, and a rule aimed at Windows desktops must not hit them.
; Numbers: Debian's p0f 3.09b p0f.fp (P0F3, LGPL) and the p0f 2.0 SYN
; database (P0F2, GPL), read for their facts and written here in our own
; lines; lwIP's opt.h defaults (IP_DEFAULT_TTL 255, TCP_MSS 536,
; TCP_WND 4 x TCP_MSS, no DF).
; ======================================================================

; Solaris 10 (P0F3): Windows' option order, but TTL 64 and 34 segments.
label = s:unix:Solaris:10
sig   = *:64:0:*:mss*34,0:mss,nop,ws,nop,nop,sok:df,id+:0

; Solaris 8 and NetApp Data ONTAP (P0F3, P0F2): the MSS written last.
label = s:unix:Solaris:8 or NetApp ONTAP
sig   = *:64:0:*:32850,1:nop,ws,nop,nop,ts,nop,nop,sok,mss:df,id+:0

; AIX 5.3 (P0F2): timestamps before SACK-permitted, each NOP-aligned.
label = s:unix:AIX:5.3
sig   = *:64:0:*:65535,1:mss,nop,ws,nop,nop,ts,nop,nop,sok:df,id+:0

; HP-UX 11.00-11.11 (P0F2): window scale right after the MSS.
label = s:unix:HP-UX:11.x
sig   = *:64:0:*:32768,0:mss,ws,nop:df,id+:0

; OpenVMS 8 (P0F3): TTL 128 without DF, window 2 x MTU. Not Windows.
label = s:other:OpenVMS:8.x
sig   = 4:128:0:1460:mtu*2,0:mss,nop,ws::0

; Tru64 (P0F3).
label = s:other:Tru64:4.x
sig   = 4:64:0:1460:32768,0:mss,nop,ws:df,id+:0

; BlackBerry (P0F3): TTL 128 without DF, timestamps after SACK-permitted.
label = s:other:BlackBerry:
sig   = *:128:0:1452:65535,0:mss,nop,nop,sok,nop,nop,ts::0

; Nintendo consoles (P0F3): Windows XP's option order at TTL 64.
label = s:other:Nintendo:3DS or Wii
sig   = *:64:0:*:32768,0:mss,nop,nop,sok:df,id+:0

; FortiGate (P0F2): options led by the window scale, MSS last.
label = s:other:FortiGate:
sig   = *:64:0:*:mss*4,0:ws,nop,sok,ts,mss:df,id+:0

; Plan 9 (P0F2).
label = s:other:Plan 9:
sig   = *:255:0:*:65535,0:mss,ws,nop::0

; Cisco IOS (P0F2): TTL 255, window 4128, no DF and IP ID zero.
label = s:other:Cisco:IOS
sig   = *:255:0:*:4128,0:mss:id-:0

; Novell NetWare (P0F2): TTL 128 with DF and nothing but the MSS.
label = s:other:Novell:NetWare
sig   = *:128:0:*:16384,0:mss:df,id+:0
sig   = *:128:0:*:6144,0:mss:df,id+:0

; AXIS print servers (P0F2): 12 segments, no DF.
label = s:other:AXIS:print server
sig   = *:64:0:*:mss*12,0:mss::0

; lwIP with its stock settings (opt.h): printers, cameras, sensors.
label = s:other:lwIP:embedded
sig   = *:255:0:536:2144,0:mss::0

; Juniper JUNOS (P0F2X): Apple's option order, but a 16384 window, or a
; non-zero ACK number on the SYN.
label = s:other:Juniper:JUNOS
sig   = *:64:0:*:16384,0:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+:0
sig   = *:64:0:*:65535,1:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+,ack+:0

; PlayStation 3 (P0F2X).
label = s:other:PlayStation:3
sig   = *:64:0:*:65535,0:mss,nop,ws,sok,nop,nop,nop,nop,ts:df,id+:0

; NetWare 6 (P0F2X): TTL 128 with DF, scale before SACK-permitted.
label = s:other:Novell:NetWare 6
sig   = *:128:0:*:6144,0:mss,ws,nop,sok,nop,nop:df,id+:0

; Last resorts, by what no mainstream desktop or server stack of the last
; twenty years sends: a SYN whose only option is the MSS (no window scaling,
; no SACK: network gear, printers and embedded stacks); the MSS written last
; (Solaris-derived stacks); timestamps before SACK-permitted with NOP pairs
; (AIX, Solaris 9, IRIX, switches); the short MSS,NOP,WS or MSS,WS,NOP of
; VMS, Tru64, HP-UX, Plan 9 and BeOS; timestamps without SACK-permitted
; (OS/400, QNX, UnixWare, CacheOS; FreeBSD 4 and Mac OS X 10.2-10.4 wrote
; it too, twenty years ago). Each at every initial TTL it was seen with.
label = g:other:Embedded or network device:MSS option only
sig   = *:255:0:*:*,*:mss::0
sig   = *:255:0:*:*,*:mss:df,id+:0
sig   = *:128:0:*:*,*:mss::0
sig   = *:128:0:*:*,*:mss:df,id+:0
sig   = *:64:0:*:*,*:mss::0
sig   = *:64:0:*:*,*:mss:df,id+:0
sig   = *:32:0:*:*,*:mss::0
sig   = *:32:0:*:*,*:mss:df,id+:0

label = g:other:Unix:Solaris-derived (MSS last)
sig   = *:64:0:*:*,*:nop,ws,nop,nop,ts,nop,nop,sok,mss:df,id+:0
sig   = *:255:0:*:*,*:nop,ws,nop,nop,ts,nop,nop,sok,mss:df,id+:0

label = g:other:Unix:AIX, Solaris or IRIX
sig   = *:64:0:*:*,*:mss,nop,ws,nop,nop,ts,nop,nop,sok:df,id+:0
sig   = *:64:0:*:*,*:mss,nop,ws,nop,nop,ts,nop,nop,sok::0
sig   = *:128:0:*:*,*:mss,nop,ws,nop,nop,ts,nop,nop,sok:df,id+:0
sig   = *:255:0:*:*,*:mss,nop,ws,nop,nop,ts,nop,nop,sok:df,id+:0

label = g:other:Unix:VMS, Tru64, HP-UX or Plan 9
sig   = *:64:0:*:*,*:mss,nop,ws::0
sig   = *:64:0:*:*,*:mss,nop,ws:df,id+:0
sig   = *:128:0:*:*,*:mss,nop,ws::0
sig   = *:64:0:*:*,*:mss,ws,nop:df,id+:0
sig   = *:255:0:*:*,*:mss,ws,nop::0
sig   = *:255:0:*:*,*:mss,nop,ws::0
sig   = *:255:0:*:*,*:nop,ws,mss:df,id+:0

; QNX 6 sends a zero TSval (quirk ts1-), RISC OS 4 an option 12 (P0F2X).
label = s:other:QNX:6
sig   = *:64:0:*:16384,0:mss,nop,ws,nop,nop,ts:ts1-:0
label = s:other:RISC OS:4
sig   = *:64:0:*:16384,0:mss,nop,ws,nop,nop,ts,nop,nop,?12:df,id+:0

label = g:other:Unix:timestamps without SACK (OS/400, QNX, UnixWare)
sig   = *:64:0:*:*,*:mss,nop,ws,nop,nop,ts:df,id+:0
sig   = *:64:0:*:*,*:mss,nop,ws,nop,nop,ts::0
