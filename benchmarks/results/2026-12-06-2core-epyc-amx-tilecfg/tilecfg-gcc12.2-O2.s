_Z4loadv:
.LFB6403:
	pushq	%rbp
	pxor	%xmm0, %xmm0
	movq	%rsp, %rbp
	andq	$-64, %rsp
	movaps	%xmm0, -64(%rsp)
	movb	$1, -64(%rsp)
#APP
# 42 "/usr/lib/gcc/x86_64-linux-gnu/12/include/amxtileintrin.h" 1
	ldtilecfg	-64(%rsp)
# 0 "" 2
#NO_APP
	leave
	ret
